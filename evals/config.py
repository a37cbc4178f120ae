"""The evals' options and search spaces: one dataclass per schema, its field defaults the only ones.

``EvalRun`` (what every eval shares), ``NllOptions``, ``SampleOptions``, ``SplitOptions`` and ``ProbeOptions``
are the options of ``igpt eval nll|sample|probe|finetune`` (``igpt.evals.cli`` takes its defaults from them,
``field_default``); ``EvalSearchConfig`` holds the Ray Tune search spaces and resources of probe and
finetune, where a YAML file given with ``--search`` and ``key=value`` overrides are merged over the defaults.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from igpt.errors import UserError

DEFAULT_L2 = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""The probes' initial L2 grid (``probe``, ``igpt.evals.score``, the demo); it widens past an edge."""


def field_default(schema: type, name: str) -> Any:
    """The default of the dataclass ``schema``'s field ``name`` (a ``default_factory``'s value)."""
    f = next(f for f in fields(schema) if f.name == name)
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise ValueError(f"{schema.__name__}.{name} has no default")


@dataclass(frozen=True)
class EvalRun:
    """What every eval shares: inputs, output directory and MLflow destination."""

    checkpoint: str
    data: str
    out: str = "eval_out"
    device: str = "auto"
    batch_size: int = 32
    limit: int | None = None
    tracking_uri: str | None = None
    experiment: str = "igpt-eval"
    run_name: str | None = None
    verbose: bool = False  # Ray Tune's console tables (probe, finetune)
    trust_checkpoint: bool = False  # load a run dir's checkpoint that is not the user's own (--trust-checkpoint)

    @property
    def uri(self) -> str:
        """``tracking_uri``, else a sqlite store in ``out``."""
        from igpt.evals.tracking import default_tracking_uri

        return self.tracking_uri or default_tracking_uri(self.out)

    def params(self) -> dict[str, Any]:
        """The MLflow params every eval logs."""
        return {"checkpoint": str(Path(self.checkpoint).resolve()), "data": str(Path(self.data).resolve()),
                "limit": self.limit, "batch_size": self.batch_size}


@dataclass(frozen=True)
class NllOptions:
    """``eval nll``'s own options."""

    split: str = "val"


@dataclass(frozen=True)
class SampleOptions:
    """``eval sample``'s own options."""

    split: str = "val"  # whose images are completed
    num_samples: int = 16  # unconditional samples
    num_images: int = 8  # real images whose bottom half is completed
    per_image: int = 3  # completions per image
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    scale: int = 4  # integer upscaling of each image in the grid
    cols: int = 8  # images per row of the unconditional grid


@dataclass(frozen=True)
class SplitOptions:
    """The splits of probe and finetune (finetune: train and validation only)."""

    train_split: str = "train"
    val_split: str = "val"
    test_split: str | None = None
    test_data: str | None = None  # shard dir of the test split when it is not --data


@dataclass(frozen=True)
class ProbeOptions:
    """``eval probe``'s own options (its splits are ``SplitOptions``)."""

    layers: str = "mid"  # 'all', 'mid' or comma-separated block indices
    concat: bool = False  # also probe the layers' pooled states concatenated
    cache_dir: str | None = None  # feature cache (default: OUT/feature_cache)
    baselines: bool = False  # also probe raw pixels and a randomly initialised model of the same shape


@dataclass(frozen=True)
class FinetuneOptions:
    """``eval finetune``."""

    init: Literal["pretrained", "random"] = "pretrained"  # random: the same architecture from scratch, labels only


class SearchConfigError(UserError):
    """A search config file or override is malformed or names an unknown key."""


@dataclass
class ProbeSearch:
    """Grid over layers (from ``--layers``) × L2 penalties, each cell one Tune trial."""

    l2: list[float] = field(default_factory=lambda: list(DEFAULT_L2))
    widen: int = 6
    """Rounds that extend a feature set's L2 grid one step past an edge where its best value lies (0: none)."""
    max_iter: int = 500
    baseline_seed: int = 0  # initialisation seed of the random-init baseline (`probe --baselines`)


@dataclass
class FinetuneSearch:
    """Grid over learning rate × λ × epochs; ASHA stops weak trials early (per epoch)."""

    lr: list[float] = field(default_factory=lambda: [1e-4, 3e-4])
    lam: list[float] = field(default_factory=lambda: [0.0, 0.5])
    epochs: list[int] = field(default_factory=lambda: [10])
    patience: int = 3
    batch_size: int = 32
    weight_decay: float = 0.0
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0


@dataclass
class Resources:
    """Per-trial resources and the Ray cluster (local Ray when ``address`` is null)."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int | None = None
    address: str | None = None
    num_cpus: int | None = None  # local Ray only
    storage_path: str | None = None  # Tune's results and checkpoints (default OUT/ray_results); shared on a cluster


@dataclass
class EvalSearchConfig:
    """probe and finetune's search spaces and resources (``load_search_config``)."""

    probe: ProbeSearch = field(default_factory=ProbeSearch)
    finetune: FinetuneSearch = field(default_factory=FinetuneSearch)
    resources: Resources = field(default_factory=Resources)


def load_search_config(path: str | None = None, overrides: list[str] | None = None) -> EvalSearchConfig:
    """Defaults ← YAML file ← ``key=value`` overrides; unknown keys are errors (``igpt.pretrain.config.load_structured``)."""
    from igpt.pretrain.config import load_structured

    return load_structured(EvalSearchConfig, path, overrides or [], error=SearchConfigError, label="search config")
