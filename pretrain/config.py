"""The training configuration: dataclasses are the schema, YAML files in ``configs/`` the presets.

``load_config("configs/cifar10-cpu-tiny.yaml", ["optim.lr=1e-3", "train.steps=100"])`` merges the
schema defaults, the YAML preset and the ``key=value`` overrides (last wins) with OmegaConf's
structured merge, so an unknown key or a value of the wrong type is an error that names the key.
The resolved config is a plain nested dict (``to_dict``) saved as ``config.yaml`` in the run dir.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.checkpoint import signal_from_name
from pretrain.model import IGPTConfig
from pretrain.precision import PRECISIONS
from pretrain.presets import model_config


@dataclass
class ModelSection:
    """The model: a preset of ``pretrain.presets.MODEL_PRESETS`` and optional per-field overrides.

    ``n_ctx`` defaults to resolution² and ``vocab_size`` to the palette size of the token shards; other ``None`` fields keep the preset's value."""

    preset: str = "igpt-tiny"
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    n_ctx: Optional[int] = None
    vocab_size: Optional[int] = None
    attn_backend: str = "sdpa"
    objective: str = "ar"
    mask_prob: float = 0.15
    activation_checkpointing: bool = False


@dataclass
class DataSection:
    """Token shards written by ``igpt data shard`` (a directory with ``manifest.json``)."""

    dir: str = MISSING
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0
    record_keys: bool = False  # append each micro-batch's step, epoch and sample keys to RUN_DIR/data_keys.rankR.jsonl


@dataclass
class OptimSection:
    """Adam with iGPT's betas, linear warmup then cosine decay to ``min_lr``, global-norm clipping."""

    lr: float = 3e-4
    min_lr: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0


@dataclass
class TrainSection:
    """Loop settings. ``micro_batch_size`` is per rank; the global batch is micro × accumulation × ranks."""

    run_dir: str = "runs/default"
    steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | bf16-module (pretrain.precision)
    log_every: int = 10
    val_every: int = 200
    val_batches: Optional[int] = 8  # micro-batches of the val split per rank and validation; null: all of it
    sample_every: int = 1000
    sample_count: int = 8
    sample_temperature: float = 1.0
    max_nonfinite: int = 5  # stop after this many consecutive steps with a non-finite loss
    compile: bool = False  # torch.compile the model through engine.compile()


@dataclass
class CheckpointSection:
    """DeepSpeed checkpoints under ``RUN_DIR/checkpoints``; preemption exits with ``preempt_exit_code``."""

    every: int = 500
    keep_last: int = 3
    verify_sha256: bool = True  # check every file against the completeness marker before loading
    preempt_exit_code: int = 124
    preempt_signal: str = "USR1"  # checkpoint and stop on it, SIGTERM and SIGINT; USR2 where NCCL catches USR1


@dataclass
class LoggingSection:
    """Tracking (rank 0): ``backend`` mlflow, or jsonl for plain files where MLflow is not installed
    (see pretrain.tracking). ``tracking_uri`` None means ``sqlite:///RUN_DIR/mlflow.db``."""

    backend: str = "mlflow"
    tracking_uri: Optional[str] = None
    experiment: str = "igpt-pretrain"
    run_name: Optional[str] = None
    peak_tflops: Optional[float] = None  # per device; None looks up pretrain.tracking.PEAK_TFLOPS


@dataclass
class DeepSpeedSection:
    """Settings turned into the DeepSpeed config by ``pretrain.deepspeed_config``.

    ``extra`` is the escape hatch: raw DeepSpeed keys deep-merged over the generated dict last, e.g.
    ``deepspeed.extra.zero_optimization.reduce_bucket_size=50000000``."""

    zero_stage: int = 0
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"  # none | cpu | nvme (ZeRO-3 only)
    nvme_path: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)


class ConfigError(ValueError):
    """A config that does not match the schema; the message names the offending key."""


_CHOICES = {
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": PRECISIONS,
    "deepspeed.offload_optimizer": ("none", "cpu", "nvme"),
    "deepspeed.offload_param": ("none", "cpu", "nvme"),
    "model.attn_backend": ("sdpa", "triton", "reference"),
    "model.objective": ("ar", "bert"),
    "logging.backend": ("mlflow", "jsonl"),
}


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    return f"config key {key!r}: {msg}" if key else msg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Merge schema defaults, the YAML preset at ``path`` and ``key=value`` overrides; return a plain dict."""
    schema = OmegaConf.structured(TrainConfig)
    layers: list[DictConfig] = []
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as err:  # yaml errors carry the line
            raise ConfigError(f"cannot parse {path}: {err}") from err
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise ConfigError(f"overrides must look like section.key=value, got {bad}")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(schema, *layers)
        resolved = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from err
    validate(resolved)
    return resolved


def validate(cfg: dict) -> None:
    """Value checks the type system cannot express; raise ConfigError naming the key."""
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        if cfg[section][key] not in choices:
            raise ConfigError(f"config key {dotted!r} = {cfg[section][key]!r}; choose one of {choices}")
    positive = ["train.steps", "train.micro_batch_size", "train.grad_accum", "train.log_every", "train.val_every",
                "train.sample_every", "train.max_nonfinite", "checkpoint.every", "checkpoint.keep_last"]
    for dotted in positive:
        section, key = dotted.split(".")
        if cfg[section][key] < 1:
            raise ConfigError(f"config key {dotted!r} must be >= 1, got {cfg[section][key]}")
    try:
        signal_from_name(cfg["checkpoint"]["preempt_signal"])
    except ValueError as err:
        raise ConfigError(f"config key 'checkpoint.preempt_signal': {err}") from None
    if cfg["train"]["val_batches"] is not None and cfg["train"]["val_batches"] < 1:
        raise ConfigError(f"config key 'train.val_batches' must be >= 1 or null (the whole split), "
                          f"got {cfg['train']['val_batches']}")
    if cfg["deepspeed"]["zero_stage"] not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'deepspeed.zero_stage' must be 0-3, got {cfg['deepspeed']['zero_stage']}")
    if len(cfg["optim"]["betas"]) != 2 or not all(0.0 <= b < 1.0 for b in cfg["optim"]["betas"]):
        raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1), got {cfg['optim']['betas']}")
    if cfg["optim"]["lr"] <= 0 or cfg["optim"]["min_lr"] < 0 or cfg["optim"]["warmup_steps"] < 0:
        raise ConfigError("config keys 'optim.lr' must be > 0, 'optim.min_lr' and 'optim.warmup_steps' >= 0")
    if cfg["deepspeed"]["offload_param"] != "none" and cfg["deepspeed"]["zero_stage"] != 3:
        raise ConfigError("config key 'deepspeed.offload_param' needs deepspeed.zero_stage=3")
    if "nvme" in (cfg["deepspeed"]["offload_param"], cfg["deepspeed"]["offload_optimizer"]) \
            and not cfg["deepspeed"]["nvme_path"]:
        raise ConfigError("config key 'deepspeed.nvme_path' is required for nvme offload")


def to_yaml(cfg: dict) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.create(cfg))


def save_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(to_yaml(cfg))
    os.replace(tmp, path)


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size", "attn_backend", "objective", "mask_prob",
                "activation_checkpointing")


def igpt_config(cfg: dict) -> IGPTConfig:
    """The IGPTConfig of a resolved training config: ``model.preset`` plus its non-null fields."""
    fields = {k: cfg["model"][k] for k in MODEL_FIELDS if cfg["model"].get(k) is not None}
    return model_config(cfg["model"]["preset"], **fields)
