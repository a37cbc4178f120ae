"""Precision modes of training, and the numerics every evaluation uses.

``train.precision`` picks one mode (``auto``: ``bf16`` on CUDA, ``fp32`` on CPU):

=============  ====================================================================================
mode           what runs in which dtype
=============  ====================================================================================
``fp32``       everything in fp32.
``bf16``       ``torch.autocast(bf16)`` around the forward, as a plain PyTorch loop does. The matmuls
               (every ``nn.Linear``, attention) run in bf16; layer norms, softmax, the loss, the
               residual stream and the embeddings stay fp32. Weights, gradients, their all-reduce
               and the Adam state are fp32. DeepSpeed sees an fp32 model.
``bf16-module`` DeepSpeed's ``bf16`` section: the module itself is cast to bf16, so weights,
               activations, the residual stream, gradients and their all-reduce are bf16; DeepSpeed's
               optimizer wrapper keeps fp32 master weights and the Adam state in fp32.
=============  ====================================================================================

``bf16`` is the default because it learns as well per token as fp32 (``benchmarks/precision_ablation.py``,
results in ``benchmarks/results/precision_ablation*.md``); ``bf16-module`` saves the fp32 weight
copy but loses precision in the bf16 residual stream and gradients.

Evaluation numerics (``eval_autocast``): fp32 weights, bf16 autocast on CUDA and plain fp32 on CPU.
Training's own validation and every ``igpt eval`` command use them, so the two agree.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal, get_args

import torch

from igpt.errors import UserError

Precision = Literal["auto", "fp32", "bf16", "bf16-module"]  # the choices of train.precision
PRECISIONS = get_args(Precision)


def resolve_precision(requested: str, device: str) -> str:
    """``train.precision`` with ``auto`` resolved: ``bf16`` on CUDA, ``fp32`` on CPU."""
    if requested not in PRECISIONS:
        raise UserError(f"precision {requested!r}; choose one of {PRECISIONS}")
    if requested == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return requested


def training_autocast(precision: str, device: str) -> AbstractContextManager:
    """The context the training forward runs in: bf16 autocast for ``bf16``, nothing otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return nullcontext()


def eval_autocast(device: str | torch.device) -> AbstractContextManager:
    """The evaluation numerics: bf16 autocast on CUDA, fp32 (no autocast) elsewhere."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()
