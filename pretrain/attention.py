"""The model's attention backends, chosen once when the model is built (``attention_backend(name)``).

A backend maps (B, H, S, D) queries, keys and values to outputs for self-attention (as many queries
as keys) and for KV-cache decoding (fewer queries than keys: the queries are the last positions):

- ``sdpa``: torch's scaled_dot_product_attention; it picks cuDNN / flash / memory-efficient itself.
  Decoding runs without its cuDNN path, which builds a new plan for every key length while sampling
  (23 s against 3 s for 16 x 512 tokens of igpt-s on an H200).
- ``triton``: our fused kernel (``kernels.flash_attention``) for self-attention, SDPA for decoding.
- ``reference``: the plain float32 implementation (``kernels.reference``), for tests and debugging.

A new backend is one more entry of ``BACKENDS`` and of the ``AttnBackend`` choices, both here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.reference import attention_reference

AttnBackend = Literal["sdpa", "triton", "reference"]  # the config's choices (IGPTConfig.attn_backend)
Attend = Callable[..., Tensor]  # (q, k, v, *, causal) -> out
_DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _sdpa_decode(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
    sq, sk = q.shape[-2], k.shape[-2]
    allowed = None
    if causal and sq > 1:
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
    with sdpa_kernel(_DECODE_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _triton(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
    from kernels import flash_attention  # imported lazily: the kernel needs triton, the rest does not

    return flash_attention(q, k, v, causal=causal)


def _reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
    return attention_reference(q, k, v, causal=causal)


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
    "sdpa": AttentionBackend("sdpa", _sdpa, _sdpa_decode),
    "triton": AttentionBackend("triton", _triton, _sdpa_decode),
    "reference": AttentionBackend("reference", _reference, _reference),
}
assert tuple(BACKENDS) == get_args(AttnBackend)


def attention_backend(name: str) -> AttentionBackend:
    """The backend called ``name``; a ValueError naming the choices otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {tuple(BACKENDS)}") from None
