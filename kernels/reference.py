"""Plain-PyTorch attention: the numerical reference for the Triton kernel and the model's ``reference`` backend
(``igpt.pretrain.attention``), the one plain implementation of the project."""
from __future__ import annotations

import math

import torch

from igpt.errors import UserError


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                           fewer_queries: bool = False) -> None:
    """Raise ValueError unless q, k, v are (B, H, S, D) tensors that attention can take; with
    ``fewer_queries``, causal attention may have fewer queries than keys (the last positions)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise UserError(f"attention expects (batch, heads, seq, head_dim) tensors; {name} has shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise UserError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise UserError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head_dim"
        )
    if causal and q.shape[2] != k.shape[2] and not (fewer_queries and q.shape[2] < k.shape[2]):
        raise UserError(
            f"causal attention needs as many queries as keys, got {q.shape[2]} and {k.shape[2]} "
            "(for KV-cache decoding of the newest token use causal=False)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise UserError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · sm_scale, causal mask) v, computed in float32 (float64 for float64 inputs).

    Same convention as torch SDPA: (B, H, S, D) tensors, sm_scale defaults to 1/sqrt(D), the causal
    mask lets query i see keys 0..i. With fewer queries than keys (KV-cache decoding) the queries are
    the last positions. Returns a tensor in q's dtype.
    """
    check_attention_inputs(q, k, v, causal, fewer_queries=True)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * scale
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.to(compute)).to(q.dtype)
