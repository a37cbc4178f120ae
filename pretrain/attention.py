"""The model's attention backends, chosen once when the model is built (``attention_backend(name)``).

A backend maps (B, H, S, D) queries, keys and values to outputs for self-attention (as many queries
as keys) and for KV-cache decoding (fewer queries than keys: the queries are the last positions):

- ``auto``: per call signature (device, dtype, head dim, sequence length, causality) the fastest of
  ``triton``, ``sdpa_cudnn`` and ``sdpa_flash`` in the measured table (``igpt.pretrain.attention_table``); SDPA on
  a CPU and where nothing was measured. Resolved once per (device, dtype, head dim, causality), printed on
  rank 0, and a constant for torch.compile.
- ``sdpa``: torch's scaled_dot_product_attention; it picks cuDNN / flash / memory-efficient itself.
  Decoding runs without its cuDNN path, which builds a new plan for every key length while sampling
  (23 s against 3 s for 16 x 512 tokens of igpt-s on an H200).
- ``sdpa_cudnn``, ``sdpa_flash``: SDPA forced to that one kernel (``sdpa_kernel``), an error where it cannot run.
- ``triton``: our fused kernel (``igpt.kernels.flash_attention``) for self-attention.
- ``reference``: the plain float32 implementation (``igpt.kernels.reference``), for tests and debugging.

Every backend but ``reference`` decodes with SDPA (without cuDNN).

A new backend is one more entry of ``BACKENDS`` and of the ``AttnBackend`` choices, both here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from igpt.errors import UserError
from igpt.kernels.reference import attention_reference
from igpt.pretrain.attention_table import Rule, auto_rule, load_entries, pick, table_path

# the config's choices (IGPTConfig.attn_backend)
AttnBackend = Literal["auto", "sdpa", "sdpa_cudnn", "sdpa_flash", "triton", "reference"]
Attend = Callable[..., Tensor]  # (q, k, v, *, causal) -> out
_DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _forced_sdpa(backend: SDPBackend) -> Attend:
    def attend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return attend


def _sdpa_decode(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
    sq, sk = q.shape[-2], k.shape[-2]
    allowed = None
    if causal and sq > 1:
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
    with sdpa_kernel(_DECODE_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _triton(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
    from igpt.kernels.flash_attention import flash_attention  # imported lazily: the kernel needs triton, the rest does not

    return flash_attention(q, k, v, causal=causal)


def _reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
    return attention_reference(q, k, v, causal=causal)


_AUTO_RULES: dict[tuple, Rule] = {}


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps the result
def _auto_rule(device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool) -> Rule:
    """``auto``'s backend per sequence length for this signature, from the table (once; printed on rank 0)."""
    key = (device, dtype, head_dim, causal)
    if key not in _AUTO_RULES:
        if device.type == "cuda":
            rule, why = auto_rule(load_entries(table_path()), torch.cuda.get_device_name(device), dtype, head_dim, causal)
        else:
            rule, why = (((None, "sdpa"),), "sdpa (not a GPU)")
        _AUTO_RULES[key] = rule
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            print(f"attention auto [{device}, {dtype}, head dim {head_dim}, {'causal' if causal else 'full'}]: {why}",
                  flush=True)
    return _AUTO_RULES[key]


def _auto(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
    name = pick(_auto_rule(q.device, q.dtype, q.shape[-1], causal), q.shape[-2])
    return BACKENDS[name].self_attention(q, k, v, causal=causal)


@dataclass(frozen=True)
class AttentionBackend:
    """``self_attention`` for as many queries as keys, ``decode`` for fewer (KV-cache sampling)."""

    name: str
    self_attention: Attend
    decode: Attend

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
        attend = self.self_attention if q.shape[-2] == k.shape[-2] else self.decode
        return attend(q, k, v, causal=causal)


BACKENDS = {
    "auto": AttentionBackend("auto", _auto, _sdpa_decode),
    "sdpa": AttentionBackend("sdpa", _sdpa, _sdpa_decode),
    "sdpa_cudnn": AttentionBackend("sdpa_cudnn", _forced_sdpa(SDPBackend.CUDNN_ATTENTION), _sdpa_decode),
    "sdpa_flash": AttentionBackend("sdpa_flash", _forced_sdpa(SDPBackend.FLASH_ATTENTION), _sdpa_decode),
    "triton": AttentionBackend("triton", _triton, _sdpa_decode),
    "reference": AttentionBackend("reference", _reference, _reference),
}
assert tuple(BACKENDS) == get_args(AttnBackend)


def attention_backend(name: str) -> AttentionBackend:
    """The backend called ``name``; a ValueError naming the choices otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown attention backend {name!r}; choose one of {tuple(BACKENDS)}") from None
