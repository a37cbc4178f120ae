"""The DeepSpeed config dict, generated from our training config.

Mapping (our key → DeepSpeed key):
  train.micro_batch_size → train_micro_batch_size_per_gpu;  train.grad_accum → gradient_accumulation_steps
  optim.grad_clip → gradient_clipping (global L2 norm), except where the training loop clips itself
      (``loop_clips_gradients``: ZeRO-0 with an fp32 module, where it clips with one foreach pass and
      keeps the norm on the device); there gradient_clipping is 0
  train.precision → bf16.enabled only for ``bf16-module`` (see ``igpt.pretrain.precision``: ``bf16`` is
      autocast over an fp32 module, which DeepSpeed sees as fp32; fp16 is not offered)
  deepspeed.zero_stage → zero_optimization.stage (0-3)
  deepspeed.offload_optimizer / offload_param → zero_optimization.offload_optimizer / offload_param
  train.device cpu → zero_optimization.contiguous_gradients false: ZeRO-1/2 then leave each gradient where
      backward put it instead of copying it into a flat buffer as it is produced, which only guards against
      GPU memory fragmentation; on CPU the copies and their hook work cost about 5% of a small model's step
  model.activation_checkpointing is not a DeepSpeed key: the model checkpoints its own blocks.
The optimizer (torch Adam) is built by the training loop, hence ``zero_allow_untested_optimizer``.

Escape hatch: ``deepspeed.extra`` holds raw DeepSpeed keys that are deep-merged over the generated
dict last, e.g. ``deepspeed.extra.zero_optimization.overlap_comm=true``.
"""
from __future__ import annotations

import copy
from typing import Any

from igpt.pretrain.config import TrainConfig
from igpt.pretrain.precision import resolve_precision


def resolve_device(cfg: TrainConfig) -> str:
    """``train.device`` with ``auto`` resolved: cuda when available, else cpu."""
    import torch

    device = cfg.train.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config train.device=cuda but torch sees no CUDA device")
    return device


def loop_clips_gradients(zero_stage: int, precision: str) -> bool:
    """Whether the training loop clips the gradients itself: at ZeRO-0 with an fp32 module the
    gradients are whole and fp32 on every rank after backward; elsewhere DeepSpeed owns them."""
    return zero_stage == 0 and precision != "bf16-module"


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in recursively (extra wins); neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _offload(kind: str, cfg: TrainConfig) -> dict[str, Any]:
    section: dict[str, Any] = {"device": kind, "pin_memory": True}
    if kind == "nvme":
        section["nvme_path"] = cfg.deepspeed.nvme_path
    return section


def build_deepspeed_config(cfg: TrainConfig, device: str) -> dict[str, Any]:
    """The DeepSpeed config dict for the resolved training config ``cfg`` on ``device`` (cpu|cuda)."""
    ds = cfg.deepspeed
    precision = resolve_precision(cfg.train.precision, device)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if device == "cpu":
        zero["contiguous_gradients"] = False
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(ds.offload_optimizer, cfg)
    if ds.offload_param != "none":
        zero["offload_param"] = _offload(ds.offload_param, cfg)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": 0.0 if loop_clips_gradients(ds.zero_stage, precision) else cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16-module", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return deep_merge(out, ds.extra)
