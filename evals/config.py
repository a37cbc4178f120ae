"""Search spaces and Ray resources for probe and fine-tuning evals (dataclasses are the schema;
a YAML file given with ``--search`` and ``key=value`` overrides are merged over the defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field

from igpt.errors import UserError



class SearchConfigError(UserError):
    """A search config file or override is malformed or names an unknown key."""


@dataclass
class ProbeSearch:
    """Grid over layers (from ``--layers``) × L2 penalties, each cell one Tune trial."""

    l2: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
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
    probe: ProbeSearch = field(default_factory=ProbeSearch)
    finetune: FinetuneSearch = field(default_factory=FinetuneSearch)
    resources: Resources = field(default_factory=Resources)


def load_search_config(path: str | None = None, overrides: list[str] | None = None) -> EvalSearchConfig:
    """Defaults ← YAML file ← ``key=value`` overrides; unknown keys are errors (``igpt.pretrain.config.load_structured``)."""
    from igpt.pretrain.config import load_structured

    return load_structured(EvalSearchConfig, path, overrides or [], error=SearchConfigError, label="search config")
