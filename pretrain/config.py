"""The training configuration: typed dataclasses are the schema, YAML files in ``configs/`` the presets.

``load_config("configs/cifar10-cpu-tiny.yaml", ["optim.lr=1e-3", "train.steps=100"])`` merges, last
wins: the schema defaults, the model preset that ``model.preset`` names (``igpt.pretrain.presets``), the
YAML file and the ``key=value`` overrides, with OmegaConf's structured merge, and returns a typed
``TrainConfig``. An unknown key, a value of the wrong type or outside its ``Literal`` choices is a
``ConfigError`` that names the key. ``save_config`` writes the resolved config as ``config.yaml``;
loading it gives an equal ``TrainConfig``. ``load_structured`` is the same merge for any schema
(the evals' search config uses it too). ``config_from_checkpoint`` reads the config a checkpoint
recorded (``to_dict``) back, older checkpoints' missing fields at their schema defaults.

Interpolation (``${oc.env:VAR}``, ``${section.key}``) is resolved in a user's own config only. A config
someone else wrote (a run dir's or a release's ``config.yaml``: ``load_config(..., plain=True)``; a
checkpoint's recorded config) must hold plain values: an interpolation there is refused, never resolved, so
a foreign file cannot copy this machine's environment into ``config.yaml`` or MLflow.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from igpt.data_pipeline.io import write_text_atomic
from igpt.errors import UserError
from igpt.pretrain.checkpoint import signal_from_name
from igpt.pretrain.model import IGPTConfig
from igpt.pretrain.precision import Precision
from igpt.pretrain.presets import MODEL_PRESETS


@dataclass
class ModelSection(IGPTConfig):
    """The model: ``igpt.pretrain.model.IGPTConfig``'s fields, starting from the preset ``preset`` names."""

    n_ctx: Optional[int] = None
    """Context; null: resolution² of the token shards (a patch model: (resolution / patch_size)² patches)."""
    vocab_size: Optional[int] = None
    """Palette size; null: the token shards' vocabulary."""
    preset: str = "igpt-tiny"
    """One of ``igpt.pretrain.presets.MODEL_PRESETS``: the layer, width and head counts the other keys override."""


@dataclass
class DataSection:
    """Token shards written by ``igpt data shard`` (a directory with ``manifest.json``)."""

    dir: str = MISSING
    """The token-shard directory."""
    train_split: str = "train"
    """Split the model trains on."""
    val_split: str = "val"
    """Split the training's validation and samples use."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: read in the training process)."""
    shuffle_buffer: int = 1000
    """Samples each worker shuffles over."""
    seed: int = 0
    """Seed of the shard order and shuffling (the stream is a pure function of it and the layout)."""
    record_keys: bool = False
    """Append each micro-batch's step, epoch and sample keys to ``RUN_DIR/data_keys.rankR.jsonl``."""
    hflip: bool = False
    """Mirror each training sample left-right with probability 1/2 (exact on palette tokens)."""
    random_crop: bool = False
    """Random crops of the training size out of a train split stored with a margin (``igpt data shard
    --margin``); false: its centre crop. The draws are keyed by (seed, epoch, sample), see igpt.data_pipeline.augment."""


@dataclass
class OptimSection:
    """Adam with iGPT's betas, linear warmup then cosine decay to ``min_lr``, global-norm clipping."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam's betas."""
    eps: float = 1e-8
    """Adam's epsilon."""
    weight_decay: float = 0.0
    """L2 weight decay."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0."""
    grad_clip: float = 1.0
    """Global L2 norm the gradients are clipped to (0: no clipping)."""


@dataclass
class TrainSection:
    """Loop settings. ``micro_batch_size`` is per rank; the global batch is micro × accumulation × ranks."""

    run_dir: str = "runs/default"
    """Checkpoints, config.yaml, losses.jsonl and the default MLflow store."""
    steps: int = 1000
    """Optimizer steps of the whole run."""
    micro_batch_size: int = 8
    """Sequences per rank and forward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seed: int = 0
    """Seed of the initial weights."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when there is one."""
    precision: Precision = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | bf16-module; see pretrain/precision.py."""
    log_every: int = 10
    """Steps between log lines and tracked metrics."""
    val_every: int = 200
    """Steps between validations (and at the end)."""
    val_batches: Optional[int] = 8
    """Micro-batches of the val split per rank and validation; null: all of it."""
    sample_every: int = 1000
    """Steps between logged sample grids."""
    sample_count: int = 8
    """Images per sample grid."""
    sample_temperature: float = 1.0
    """Sampling temperature of the grids."""
    max_nonfinite: int = 5
    """Stop after this many consecutive steps with a non-finite loss."""
    compile: bool = False
    """torch.compile the model through engine.compile()."""
    init_from: Optional[str] = None
    """A release or run dir (``igpt export``, ``igpt import hf``) whose weights the run starts from, with a fresh
    optimizer and schedule; its palette must be the data's and its model this one. Not applied when the run
    resumes a checkpoint (``--resume``)."""


@dataclass
class CheckpointSection:
    """DeepSpeed checkpoints under ``RUN_DIR/checkpoints``; preemption exits with ``preempt_exit_code``."""

    every: int = 500
    """Steps between checkpoints (and at the end)."""
    keep_last: int = 3
    """Complete checkpoints kept."""
    verify_sha256: bool = True
    """Check every file against the completeness marker before loading."""
    preempt_exit_code: int = 124
    """Exit code after a preemption checkpoint: "requeue me"."""
    preempt_signal: str = "USR1"
    """Checkpoint and stop on it, SIGTERM and SIGINT; USR2 where NCCL catches USR1."""


@dataclass
class LoggingSection:
    """Tracking (rank 0), see igpt.pretrain.tracking."""

    backend: Literal["mlflow", "jsonl"] = "mlflow"
    """mlflow, or jsonl: plain files where MLflow is not installed."""
    tracking_uri: Optional[str] = None
    """null: sqlite:///RUN_DIR/mlflow.db."""
    experiment: str = "igpt-pretrain"
    """MLflow experiment name."""
    run_name: Optional[str] = None
    """MLflow run name (null: the run dir's name)."""
    peak_tflops: Optional[float] = None
    """Per device, for MFU; null looks up igpt.pretrain.tracking.PEAK_TFLOPS."""


@dataclass
class DeepSpeedSection:
    """Settings turned into the DeepSpeed config by ``igpt.pretrain.deepspeed_config``."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """Where ZeRO keeps the optimizer state."""
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    """Where ZeRO-3 keeps the parameters."""
    nvme_path: Optional[str] = None
    """Directory for nvme offload."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed keys deep-merged over the generated dict last, e.g.
    ``deepspeed.extra.zero_optimization.reduce_bucket_size=50000000``."""


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def global_batch(self, world_size: int = 1) -> int:
        """Sequences of one optimizer step on ``world_size`` ranks: micro-batch × accumulation × ranks."""
        return self.train.micro_batch_size * self.train.grad_accum * world_size

    def tokens_per_step(self, world_size: int = 1) -> int:
        """Tokens (sequence positions: pixels, or patches) of one optimizer step on ``world_size`` ranks
        (``model.n_ctx`` resolved from the data)."""
        return self.global_batch(world_size) * self.model.n_ctx

    def pixels_per_step(self, world_size: int = 1) -> int:
        """Image pixels of one optimizer step: ``tokens_per_step``, times patch_size² for a patch model (whose
        tokens, sequence positions, are patches), so that pixel and patch runs compare."""
        per_token = self.model.patch_size ** 2 if self.model.unit == "patch" else 1
        return self.tokens_per_step(world_size) * per_token


class ConfigError(UserError):
    """A config that does not match the schema; the message names the offending key."""


Schema = TypeVar("Schema")
# the model fields a resumed checkpoint must share with the run: all of IGPTConfig's (not the preset's name)
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(IGPTConfig))


def _describe(err: OmegaConfBaseException, label: str) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    return f"{label} key {key!r}: {msg}" if key else f"{label}: {msg}"


def _read_yaml(path: str | os.PathLike, error: type[ValueError] = ConfigError, label: str = "config") -> DictConfig:
    """The YAML file ``path``, unresolved; ``error`` when it is missing or does not parse."""
    if not Path(path).is_file():
        raise error(f"{label} file not found: {path}")
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml errors carry the line
        raise error(f"cannot parse {path}: {err}") from err


def _interpolated_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Dotted keys of the strings in plain nested dicts and lists that hold an interpolation (``${``)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(value, str) and "${" in value:
            yield f"{prefix}{key}"
        else:
            yield from _interpolated_keys(value, f"{prefix}{key}.")


def refuse_interpolation(values: Any, source: str) -> None:
    """Raise ConfigError naming ``source`` and the first key of ``values`` (plain nested dicts and lists) whose
    value holds an interpolation: a config someone else wrote is never resolved."""
    key = next(_interpolated_keys(values), None)
    if key is not None:
        raise ConfigError(f"{source}: config key {key!r} holds an interpolation (${{…}}); a config from a run dir, "
                          "a release or a checkpoint must hold plain values and is never resolved")


def load_structured(schema: type[Schema], path: str | os.PathLike | None, overrides: Sequence[str] = (), *,
                    under: Sequence[dict] = (), error: type[ValueError] = ConfigError,
                    label: str = "config") -> Schema:
    """``schema``'s defaults ← ``under`` (plain dicts) ← the YAML at ``path`` ← ``key=value`` overrides,
    as a ``schema`` instance; a bad file, key or value raises ``error`` naming the key."""
    layers = [] if path is None else [_read_yaml(path, error, label)]
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise error(f"overrides must look like section.key=value, got {bad}")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(OmegaConf.structured(schema), *under, *layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise error(_describe(err, label)) from err
    except ValueError as err:  # a dataclass's own check (e.g. IGPTConfig's)
        raise error(f"{label}: {err}") from err


def _preset_layer(path: str | os.PathLike | None, overrides: Sequence[str]) -> dict:
    """The model preset's values, as the layer under the YAML file: the preset the overrides, else the file,
    else the schema names."""
    preset = ModelSection.preset
    try:
        file_model = OmegaConf.load(path).get("model") or {} if path is not None and Path(path).is_file() else {}
        preset = file_model.get("preset", preset)
    except Exception:  # load_structured reports an unreadable file
        pass
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "model.preset":
            preset = value.strip()
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"config key 'model.preset' = {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    return {"model": MODEL_PRESETS[preset]}


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *,
                plain: bool = False) -> TrainConfig:
    """Schema defaults ← the model preset ← the YAML at ``path`` ← ``key=value`` overrides, checked. ``plain``:
    the file is someone else's (a run dir's or a release's), so an interpolation in it is refused."""
    if plain and path is not None:
        refuse_interpolation(OmegaConf.to_container(_read_yaml(path)), str(path))
    cfg = load_structured(TrainConfig, path, overrides, under=[_preset_layer(path, overrides)])
    validate(cfg)
    return cfg


def _known_keys(schema: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without the keys the dataclass ``schema`` lacks, recursively into its dataclass fields."""
    hints = typing.get_type_hints(schema)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in hints:
            kind = hints[key]
            out[key] = _known_keys(kind, value) if dataclasses.is_dataclass(kind) and isinstance(value, dict) else value
    return out


def config_from_checkpoint(saved: dict[str, Any], source: str = "checkpoint") -> TrainConfig:
    """The ``TrainConfig`` of a checkpoint's client state (``to_dict`` of the run's config; ``source`` names the
    checkpoint in errors). A field the checkpoint lacks takes its schema default (it was saved before the field
    existed, so the field had its default); a key the schema no longer has is dropped; an interpolation is
    refused. Not ``validate``d: it describes a past run."""
    refuse_interpolation(saved, source)
    return load_structured(TrainConfig, None, under=[_known_keys(TrainConfig, saved)], label="checkpoint config")


# The largest vocabulary: tokens are stored as uint16 (igpt.data_pipeline.shard).
MAX_VOCAB = 1 << 16
# Seeds feed np.random.seed (< 2**32) after adding 1000 × rank: a bound that leaves room for any world size.
MAX_SEED = (1 << 31) - 1
# The preemption exit code means "a checkpoint was written, requeue me", so it must not be a code that other
# endings produce: 0 (success), 1 (Python's uncaught exception), 2 (the igpt CLI's user error), 126-255 (the
# shell's "cannot run" and 128+N "killed by signal N"); above 255 an exit status is truncated.
PREEMPT_EXIT_CODES = range(3, 126)


def _ranges(cfg: TrainConfig) -> list[tuple[str, Any, bool, str]]:
    """(key, value, whether it is in range, the range in words) for every numeric key of the schema that the model's
    own checks (``IGPTConfig.__post_init__``) leave open; comparisons like ``0 < x < inf``, which NaN and inf fail."""
    m, d, o, t, c, lg = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.checkpoint, cfg.logging
    positive = {"train.steps": t.steps, "train.micro_batch_size": t.micro_batch_size, "train.grad_accum": t.grad_accum,
                "train.log_every": t.log_every, "train.val_every": t.val_every, "train.sample_every": t.sample_every,
                "train.sample_count": t.sample_count, "train.max_nonfinite": t.max_nonfinite,
                "checkpoint.every": c.every, "checkpoint.keep_last": c.keep_last}
    return [
        *((key, value, value >= 1, ">= 1") for key, value in positive.items()),
        ("train.val_batches", t.val_batches, t.val_batches is None or t.val_batches >= 1,
         ">= 1 or null (the whole split)"),
        ("model.vocab_size", m.vocab_size, m.vocab_size is None or 1 <= m.vocab_size <= MAX_VOCAB,
         f"in 1..{MAX_VOCAB} (uint16 tokens) or null (the data's)"),
        ("model.init_std", m.init_std, 0 < m.init_std < math.inf, "> 0 and finite"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0"),
        ("data.shuffle_buffer", d.shuffle_buffer, d.shuffle_buffer >= 0, ">= 0 (0 or 1: no shuffling)"),
        ("data.seed", d.seed, 0 <= d.seed <= MAX_SEED, f"in 0..{MAX_SEED}"),
        ("train.seed", t.seed, 0 <= t.seed <= MAX_SEED, f"in 0..{MAX_SEED}"),
        ("train.sample_temperature", t.sample_temperature, 0 <= t.sample_temperature < math.inf,
         ">= 0 and finite (0: the most likely token)"),
        ("optim.lr", o.lr, 0 < o.lr < math.inf, "> 0 and finite"),
        ("optim.min_lr", o.min_lr, 0 <= o.min_lr <= o.lr, f"in [0, optim.lr = {o.lr}]"),
        ("optim.betas", o.betas, len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "two numbers in [0, 1)"),
        ("optim.eps", o.eps, 0 < o.eps < math.inf, "> 0 and finite"),
        ("optim.weight_decay", o.weight_decay, 0 <= o.weight_decay < math.inf, ">= 0 and finite"),
        ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, ">= 0"),
        ("optim.grad_clip", o.grad_clip, 0 <= o.grad_clip < math.inf, ">= 0 and finite (0: no clipping)"),
        ("checkpoint.preempt_exit_code", c.preempt_exit_code, c.preempt_exit_code in PREEMPT_EXIT_CODES,
         f"in {PREEMPT_EXIT_CODES.start}..{PREEMPT_EXIT_CODES.stop - 1} (0, 1, 2 and 126-255 mean other endings)"),
        ("logging.peak_tflops", lg.peak_tflops, lg.peak_tflops is None or 0 < lg.peak_tflops < math.inf,
         "> 0 and finite, or null"),
    ]


def validate(cfg: TrainConfig) -> None:
    """Value checks the type system cannot express; raise ConfigError naming the key (and the value)."""
    for key, value, ok, allowed in _ranges(cfg):
        if not ok:
            raise ConfigError(f"config key {key!r} must be {allowed}, got {value!r}")
    try:
        signal_from_name(cfg.checkpoint.preempt_signal)
    except ValueError as err:
        raise ConfigError(f"config key 'checkpoint.preempt_signal': {err}") from None
    ds = cfg.deepspeed
    if ds.offload_param != "none" and ds.zero_stage != 3:
        raise ConfigError("config key 'deepspeed.offload_param' needs deepspeed.zero_stage=3")
    if "nvme" in (ds.offload_param, ds.offload_optimizer) and not ds.nvme_path:
        raise ConfigError("config key 'deepspeed.nvme_path' is required for nvme offload")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain nested dicts and lists (what checkpoints and trackers store)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML atomically (temp file, then rename)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(to_yaml(cfg), path)


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
