"""What each eval returns and writes to ``OUT/summary.json``: one dataclass per eval.

``to_dict()`` is the summary.json content (field order is key order; ``eval`` first, ``mlflow`` last)
and ``from_dict()`` reads it back (the demo reuses a cached summary.json).
"""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field, fields
from typing import Any, ClassVar, TypeVar, Union

Layer = Union[int, str]  # a block index, or the label of a concatenation of several (inputs.concat_label)
R = TypeVar("R", bound="Record")
SummaryT = TypeVar("SummaryT", bound="Summary")


def _plain(value: Any) -> Any:
    """``value`` with every record in it turned into its dict."""
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass
class Record:
    """A JSON object as a dataclass; fields named in ``OPTIONAL`` are left out while None."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)
                if not (f.name in self.OPTIONAL and getattr(self, f.name) is None)}

    @classmethod
    def from_dict(cls: type[R], d: dict[str, Any]) -> R:
        return cls(**d)


@dataclass
class MlflowRef(Record):
    """Where the eval's parent run is."""

    tracking_uri: str
    experiment: str
    parent_run_id: str


@dataclass
class Summary(Record):
    """The fields every summary shares: which eval (``EVAL``) and its MLflow run (set once it is logged)."""

    EVAL: ClassVar[str]
    OPTIONAL: ClassVar[tuple[str, ...]] = ("mlflow",)

    mlflow: MlflowRef | None = field(default=None, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        mlflow = d.pop("mlflow", None)
        return {"eval": self.EVAL, **d, **({} if mlflow is None else {"mlflow": mlflow})}

    def brief(self) -> dict[str, Any]:
        """``to_dict()`` without the bulky confusion matrix."""
        return {k: v for k, v in self.to_dict().items() if k != "confusion_matrix"}

    @classmethod
    def from_dict(cls: type[SummaryT], d: dict[str, Any]) -> SummaryT:
        if d.get("eval") != cls.EVAL:
            raise ValueError(f"not a {cls.EVAL} summary: eval={d.get('eval')!r}")
        rest = {k: v for k, v in d.items() if k != "eval"}
        if rest.get("mlflow") is not None:
            rest["mlflow"] = MlflowRef.from_dict(rest["mlflow"])
        return cls(**cls._typed(rest))

    @classmethod
    def _typed(cls, d: dict[str, Any]) -> dict[str, Any]:
        """``d``'s nested records as dataclasses (for the summaries that have some)."""
        return d


@dataclass
class NllSummary(Summary):
    """``eval nll``: mean loss with a 95% interval over images (``igpt.evals.nll.summarize``)."""

    EVAL: ClassVar[str] = "nll"

    OPTIONAL: ClassVar[tuple[str, ...]] = ("mlflow", "nats_per_token", "nats_ci_low", "nats_ci_high", "bits_per_pixel",
                                           "bpp_ci_low", "bpp_ci_high", "sem_nats", "mse", "mse_ci_low",
                                           "mse_ci_high", "sem_mse")

    split: str
    images: int
    nats_per_token: float | None = None  # the likelihood: None for a patch model's pixels target
    nats_ci_low: float | None = None
    nats_ci_high: float | None = None
    bits_per_pixel: float | None = None
    bpp_ci_low: float | None = None
    bpp_ci_high: float | None = None
    sem_nats: float | None = None
    _: KW_ONLY
    seconds: float
    mse: float | None = None  # a pixels target's mean squared error on its normalised patches, else None
    mse_ci_low: float | None = None
    mse_ci_high: float | None = None
    sem_mse: float | None = None


@dataclass
class SampleSummary(Summary):
    """``eval sample``: the PNG grids written ({"samples"|"completions": path})."""

    EVAL: ClassVar[str] = "sample"

    resolution: int
    files: dict[str, str]


@dataclass
class ProbeBest(Record):
    """The selected probe: its features (a layer or a concatenation), L2 and validation accuracy."""

    layer: Layer
    l2: float
    val_acc: float


@dataclass
class ProbeLayer(Record):
    """One feature set's best probe, the L2 values searched and whether the best still lies at an edge."""

    l2: float
    val_acc: float
    eval_acc: float  # on the reported split (test, else validation)
    l2_searched: list[float]
    l2_at_edge: bool


@dataclass
class Baseline(Record):
    """The best probe on a baseline's features (raw pixels: no layer; a random network: its seed)."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("seed",)

    layer: Layer | None
    l2: float
    val_acc: float
    accuracy: float  # on the reported split, as the model's
    trials: int
    l2_searched: list[float]
    seed: int | None = None


@dataclass
class ProbeSummary(Summary):
    """``eval probe``: the best probe's accuracy, each feature set's best and, with ``--baselines``, the
    baselines' and whether the model beats both."""

    EVAL: ClassVar[str] = "probe"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("mlflow", "baselines", "beats_baselines")

    accuracy: float
    accuracy_split: str
    note: str
    best: ProbeBest
    per_layer: dict[str, ProbeLayer]  # keyed by str(layer)
    trials: int
    num_train: int
    num_val: int
    confusion_matrix: list[list[int]]
    class_names: list[str] | None
    baselines: dict[str, Baseline] | None = None
    beats_baselines: bool | None = None

    @classmethod
    def _typed(cls, d: dict[str, Any]) -> dict[str, Any]:
        base = d.get("baselines")
        return {**d, "best": ProbeBest.from_dict(d["best"]),
                "per_layer": {k: ProbeLayer.from_dict(v) for k, v in d["per_layer"].items()},
                "baselines": None if base is None else {k: Baseline.from_dict(v) for k, v in base.items()}}


@dataclass
class FinetuneTrial(Record):
    config: dict[str, Any]  # lr, lam, epochs
    best_val_acc: float
    epochs_run: int


@dataclass
class FinetuneSummary(Summary):
    """``eval finetune``: the best trial's validation accuracy, its config and per-epoch curve, every trial."""

    EVAL: ClassVar[str] = "finetune"

    accuracy: float
    accuracy_split: str
    note: str
    best: dict[str, Any]  # the best trial's config and epochs_run
    best_trial_val_acc_per_epoch: list[float]
    trials: list[FinetuneTrial]
    num_train: int
    num_val: int
    confusion_matrix: list[list[int]]
    class_names: list[str] | None
    init: str = "pretrained"  # the weights fine-tuned: the checkpoint's, or "random" (the supervised baseline)

    @classmethod
    def _typed(cls, d: dict[str, Any]) -> dict[str, Any]:
        return {**d, "trials": [FinetuneTrial.from_dict(t) for t in d["trials"]]}
