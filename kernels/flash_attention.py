"""Triton flash attention, forward and backward (FlashAttention-2 style), on (B, H, S, D) tensors.

Forward: one program per (query block, batch·head) streams key/value blocks with an online softmax
(exp2, scale folded with log2 e) and stores the output and the row log-sum-exp (base 2). Causal
attention runs the blocks left of the diagonal without masks and only the diagonal block masked.
Backward: `delta = rowsum(dO·O)`, then ONE fused kernel: program i accumulates dK and dV of key block i
over the query blocks, then dQ of query block i over the key blocks (no atomics). Under the causal mask
the first part shrinks as i grows and the second grows, so the programs are balanced.

Head dims that are not powers of two (iGPT-L's 96) are split into a power-of-two chunk and a tail
(64 + 32), so no matrix product runs over padding; any sequence length works (masked edges,
specialised away when the length divides the blocks).
Under TRITON_INTERPRET=1 (CPU tests) every tile is computed in float32, because the interpreter's
bfloat16 arithmetic is wrong; on a GPU the matrix products take the input dtype with float32 accumulators.
Configs come from a small table (select_configs); IGPT_FLASH_AUTOTUNE=1 autotunes a short list instead (GPU only).

Host cost per call is kept low (the kernels of one S=1024 layer take well under a millisecond): input
validation and the launch plan (grids, constexprs, configs) are cached per shape, dtype, device and
causality; constexprs are passed positionally; q, k=v and dO each pass one stride set, the buffers we
allocate (O, dQ, dK, dV) are contiguous and pass none; three launches per forward+backward.

Forward and backward are torch custom ops (``torch.ops.igpt.flash_attention`` and ``…_backward``, with fake
implementations and the autograd formula registered), so torch.compile(fullgraph=True) traces
flash_attention as one opaque call each way; validation and planning run inside the implementations.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from igpt.errors import UserError
from igpt.kernels.reference import check_attention_inputs

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# ----------------------------------------------------------------------------------------------
# tile helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, offs_r, offs_d, n_rows, D, CHECK_R: tl.constexpr, CHECK_D: tl.constexpr, DTYPE: tl.constexpr):
    """Load a (rows, head_dim) tile, zero outside the tensor, cast to DTYPE."""
    if CHECK_R:
        if CHECK_D:
            x = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
        else:
            x = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
    else:
        if CHECK_D:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
        else:
            x = tl.load(ptrs)
    return x.to(DTYPE)


@triton.jit
def _store_tile(ptrs, x, offs_r, offs_d, n_rows, D, CHECK_R: tl.constexpr, CHECK_D: tl.constexpr):
    """Store a (rows, head_dim) tile in the pointer's dtype, skipping what lies outside the tensor."""
    x = x.to(ptrs.dtype.element_ty)
    if CHECK_R:
        if CHECK_D:
            tl.store(ptrs, x, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < D))
        else:
            tl.store(ptrs, x, mask=offs_r[:, None] < n_rows)
    else:
        if CHECK_D:
            tl.store(ptrs, x, mask=offs_d[None, :] < D)
        else:
            tl.store(ptrs, x)


@triton.jit
def _load_row(ptrs, offs, n, other, CHECK: tl.constexpr):
    """Load a float32 vector, `other` outside the tensor."""
    if CHECK:
        return tl.load(ptrs, mask=offs < n, other=other)
    else:
        return tl.load(ptrs)


# ----------------------------------------------------------------------------------------------
# forward
#
# The head dim is held as a power-of-two chunk of BLOCK_D0 columns plus, when HAS_TAIL, a tail chunk
# of BLOCK_D1 columns (96 = 64 + 32), so that no matrix product runs over padding. Without a tail the
# "1" tiles are never loaded and their placeholders are dead code.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, s_ks, s_vs, offs_m, offs_d0, offs_d1, lo, hi, SK, D, qk_scale,
    BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, CHECK_N: tl.constexpr, CHECK_D0: tl.constexpr,
    HAS_TAIL: tl.constexpr, CHECK_D1: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online-softmax accumulation over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * s_ks
        v_ptrs = v_base + offs_n[:, None] * s_vs
        k0 = _load_tile(k_ptrs + offs_d0[None, :], offs_n, offs_d0, SK, D, CHECK_N, CHECK_D0, DOT_DTYPE)
        qk = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
        if HAS_TAIL:
            k1 = _load_tile(k_ptrs + offs_d1[None, :], offs_n, offs_d1, SK, D, CHECK_N, CHECK_D1, DOT_DTYPE)
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=PRECISION)
        qk = qk * qk_scale
        if CAUSAL_MASK:
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        if CHECK_N:
            qk = tl.where(offs_n[None, :] < SK, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(DOT_DTYPE)
        v0 = _load_tile(v_ptrs + offs_d0[None, :], offs_n, offs_d0, SK, D, CHECK_N, CHECK_D0, DOT_DTYPE)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if HAS_TAIL:
            v1 = _load_tile(v_ptrs + offs_d1[None, :], offs_n, offs_d1, SK, D, CHECK_N, CHECK_D1, DOT_DTYPE)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@triton.jit(do_not_specialize=["H"])
def _fwd_kernel(
    Q, K, V, O, LSE, qk_scale, s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, H, SQ, SK, D,
    CAUSAL: tl.constexpr, BLOCK_D0: tl.constexpr, CHECK_D0: tl.constexpr, HAS_TAIL: tl.constexpr,
    BLOCK_D1: tl.constexpr, CHECK_D1: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
):
    """O and LSE of one query block. Q has strides s_q*, K and V share s_k*; O is contiguous."""
    # Heaviest (causal) query blocks of each head first.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    k_base = K + off_b * s_kb + off_h * s_kh
    v_base = V + off_b * s_kb + off_h * s_kh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    q_ptrs = Q + off_b * s_qb + off_h * s_qh + offs_m[:, None] * s_qs
    o_ptrs = O + bh.to(tl.int64) * SQ * D + offs_m[:, None] * D
    q0 = _load_tile(q_ptrs + offs_d0[None, :], offs_m, offs_d0, SQ, D, CHECK_M, CHECK_D0, DOT_DTYPE)
    if HAS_TAIL:
        q1 = _load_tile(q_ptrs + offs_d1[None, :], offs_m, offs_d1, SQ, D, CHECK_M, CHECK_D1, DOT_DTYPE)
    else:
        q1 = q0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    if CAUSAL:
        lo = start_m * BLOCK_M
        acc0, acc1, l_i, m_i = _fwd_inner(
            acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, s_ks, s_ks, offs_m, offs_d0, offs_d1, 0, lo, SK, D, qk_scale,
            BLOCK_N, False, False, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
        )
        hi = tl.minimum(lo + BLOCK_M, SK)
        acc0, acc1, l_i, m_i = _fwd_inner(
            acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, s_ks, s_ks, offs_m, offs_d0, offs_d1, lo, hi, SK, D, qk_scale,
            BLOCK_N, True, CHECK_N, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
        )
    else:
        acc0, acc1, l_i, m_i = _fwd_inner(
            acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, s_ks, s_ks, offs_m, offs_d0, offs_d1, 0, SK, SK, D, qk_scale,
            BLOCK_N, False, CHECK_N, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
        )
    inv_l = 1.0 / l_i
    _store_tile(o_ptrs + offs_d0[None, :], acc0 * inv_l[:, None], offs_m, offs_d0, SQ, D, CHECK_M, CHECK_D0)
    if HAS_TAIL:
        _store_tile(o_ptrs + offs_d1[None, :], acc1 * inv_l[:, None], offs_m, offs_d1, SQ, D, CHECK_M, CHECK_D1)
    lse_ptrs = LSE + bh.to(tl.int64) * SQ + offs_m
    lse = m_i + tl.log2(l_i)
    if CHECK_M:
        tl.store(lse_ptrs, lse, mask=offs_m < SQ)
    else:
        tl.store(lse_ptrs, lse)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["H"])
def _bwd_preprocess_kernel(O, DO, DELTA, s_db, s_dh, s_ds, H, SQ, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[bh, i] = sum_d O[i, d] · dO[i, d], in float32 (O contiguous, dO with strides s_d*)."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < SQ) & (offs_d[None, :] < D)
    o = tl.load(O + bh.to(tl.int64) * SQ * D + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b * s_db + off_h * s_dh + offs_m[:, None] * s_ds + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * SQ + offs_m, delta, mask=offs_m < SQ)


@triton.jit
def _bwd_dkdv_inner(
    dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base, s_qs, s_dos,
    offs_n, offs_d0, offs_d1, lo, hi, SQ, D, qk_scale,
    BLOCK_M: tl.constexpr, CAUSAL_MASK: tl.constexpr, CHECK_M: tl.constexpr, CHECK_D0: tl.constexpr,
    HAS_TAIL: tl.constexpr, CHECK_D1: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulate dK (unscaled) and dV of one key block over query blocks [lo, hi), in transposed form."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + offs_m[:, None] * s_qs
        do_ptrs = do_base + offs_m[:, None] * s_dos
        q0 = _load_tile(q_ptrs + offs_d0[None, :], offs_m, offs_d0, SQ, D, CHECK_M, CHECK_D0, DOT_DTYPE)
        qk_t = tl.dot(k0, tl.trans(q0), input_precision=PRECISION)
        if HAS_TAIL:
            q1 = _load_tile(q_ptrs + offs_d1[None, :], offs_m, offs_d1, SQ, D, CHECK_M, CHECK_D1, DOT_DTYPE)
            qk_t = tl.dot(k1, tl.trans(q1), qk_t, input_precision=PRECISION)
        lse = _load_row(lse_base + offs_m, offs_m, SQ, float("inf"), CHECK_M)
        p_t = tl.exp2(qk_t * qk_scale - lse[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do0 = _load_tile(do_ptrs + offs_d0[None, :], offs_m, offs_d0, SQ, D, CHECK_M, CHECK_D0, DOT_DTYPE)
        dv0 = tl.dot(p_t.to(DOT_DTYPE), do0, dv0, input_precision=PRECISION)
        dp_t = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)
        if HAS_TAIL:
            do1 = _load_tile(do_ptrs + offs_d1[None, :], offs_m, offs_d1, SQ, D, CHECK_M, CHECK_D1, DOT_DTYPE)
            dv1 = tl.dot(p_t.to(DOT_DTYPE), do1, dv1, input_precision=PRECISION)
            dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=PRECISION)
        delta = _load_row(delta_base + offs_m, offs_m, SQ, 0.0, CHECK_M)
        ds_t = (p_t * (dp_t - delta[None, :])).to(DOT_DTYPE)
        dk0 = tl.dot(ds_t, q0, dk0, input_precision=PRECISION)
        if HAS_TAIL:
            dk1 = tl.dot(ds_t, q1, dk1, input_precision=PRECISION)
    return dk0, dk1, dv0, dv1


@triton.jit
def _bwd_dq_inner(
    dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, s_ks, s_vs, offs_m, offs_d0, offs_d1, lo, hi, SK, D,
    qk_scale,
    BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, CHECK_N: tl.constexpr, CHECK_D0: tl.constexpr,
    HAS_TAIL: tl.constexpr, CHECK_D1: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulate dQ (unscaled) of one query block over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * s_ks
        v_ptrs = v_base + offs_n[:, None] * s_vs
        k0 = _load_tile(k_ptrs + offs_d0[None, :], offs_n, offs_d0, SK, D, CHECK_N, CHECK_D0, DOT_DTYPE)
        v0 = _load_tile(v_ptrs + offs_d0[None, :], offs_n, offs_d0, SK, D, CHECK_N, CHECK_D0, DOT_DTYPE)
        qk = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
        dp = tl.dot(do0, tl.trans(v0), input_precision=PRECISION)
        if HAS_TAIL:
            k1 = _load_tile(k_ptrs + offs_d1[None, :], offs_n, offs_d1, SK, D, CHECK_N, CHECK_D1, DOT_DTYPE)
            v1 = _load_tile(v_ptrs + offs_d1[None, :], offs_n, offs_d1, SK, D, CHECK_N, CHECK_D1, DOT_DTYPE)
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=PRECISION)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=PRECISION)
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        if CHECK_N:
            p = tl.where(offs_n[None, :] < SK, p, 0.0)
        ds = (p * (dp - delta[:, None])).to(DOT_DTYPE)
        dq0 = tl.dot(ds, k0, dq0, input_precision=PRECISION)
        if HAS_TAIL:
            dq1 = tl.dot(ds, k1, dq1, input_precision=PRECISION)
    return dq0, dq1


@triton.jit(do_not_specialize=["H"])
def _bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, qk_scale, sm_scale,
    s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_db, s_dh, s_ds, H, SQ, SK, D,
    CAUSAL: tl.constexpr, BLOCK_D0: tl.constexpr, CHECK_D0: tl.constexpr, HAS_TAIL: tl.constexpr,
    BLOCK_D1: tl.constexpr, CHECK_D1: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
):
    """dK, dV of key block `pid` (over query steps of BLOCK_M), then dQ of query block `pid` (over key steps).

    Both blocks hold BLOCK_N rows. Under the causal mask the early key blocks see the most queries and the
    early query blocks the fewest keys, so every program does the same work. Q has strides s_q*, K and V
    share s_k*, dO has s_d*; DQ, DK, DV are contiguous. CHECK_M / CHECK_N: SQ / SK leave partial blocks.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    q_base = Q + off_b * s_qb + off_h * s_qh
    k_base = K + off_b * s_kb + off_h * s_kh
    v_base = V + off_b * s_kb + off_h * s_kh
    do_base = DO + off_b * s_db + off_h * s_dh
    lse_base = LSE + bh.to(tl.int64) * SQ
    delta_base = DELTA + bh.to(tl.int64) * SQ
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)

    start_n = pid * BLOCK_N
    if start_n < SK:  # dK, dV
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * s_ks
        v_ptrs = v_base + offs_n[:, None] * s_ks
        k0 = _load_tile(k_ptrs + offs_d0[None, :], offs_n, offs_d0, SK, D, CHECK_N, CHECK_D0, DOT_DTYPE)
        v0 = _load_tile(v_ptrs + offs_d0[None, :], offs_n, offs_d0, SK, D, CHECK_N, CHECK_D0, DOT_DTYPE)
        if HAS_TAIL:
            k1 = _load_tile(k_ptrs + offs_d1[None, :], offs_n, offs_d1, SK, D, CHECK_N, CHECK_D1, DOT_DTYPE)
            v1 = _load_tile(v_ptrs + offs_d1[None, :], offs_n, offs_d1, SK, D, CHECK_N, CHECK_D1, DOT_DTYPE)
        else:
            k1 = k0
            v1 = v0
        dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
        dv0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        if CAUSAL:
            hi = tl.minimum(start_n + BLOCK_N, SQ)
            dk0, dk1, dv0, dv1 = _bwd_dkdv_inner(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base, s_qs, s_ds,
                offs_n, offs_d0, offs_d1, start_n, hi, SQ, D, qk_scale,
                BLOCK_M, True, CHECK_M, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
            )
            dk0, dk1, dv0, dv1 = _bwd_dkdv_inner(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base, s_qs, s_ds,
                offs_n, offs_d0, offs_d1, start_n + BLOCK_N, SQ, SQ, D, qk_scale,
                BLOCK_M, False, CHECK_M, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
            )
        else:
            dk0, dk1, dv0, dv1 = _bwd_dkdv_inner(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base, s_qs, s_ds,
                offs_n, offs_d0, offs_d1, 0, SQ, SQ, D, qk_scale,
                BLOCK_M, False, CHECK_M, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
            )
        kv_off = bh.to(tl.int64) * SK * D + offs_n[:, None] * D
        _store_tile(DK + kv_off + offs_d0[None, :], dk0 * sm_scale, offs_n, offs_d0, SK, D, CHECK_N, CHECK_D0)
        _store_tile(DV + kv_off + offs_d0[None, :], dv0, offs_n, offs_d0, SK, D, CHECK_N, CHECK_D0)
        if HAS_TAIL:
            _store_tile(DK + kv_off + offs_d1[None, :], dk1 * sm_scale, offs_n, offs_d1, SK, D, CHECK_N, CHECK_D1)
            _store_tile(DV + kv_off + offs_d1[None, :], dv1, offs_n, offs_d1, SK, D, CHECK_N, CHECK_D1)

    start_m = pid * BLOCK_N
    if start_m < SQ:  # dQ: the query block is BLOCK_N rows, stepping over keys by BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_N)
        q_ptrs = q_base + offs_m[:, None] * s_qs
        do_ptrs = do_base + offs_m[:, None] * s_ds
        q0 = _load_tile(q_ptrs + offs_d0[None, :], offs_m, offs_d0, SQ, D, CHECK_M, CHECK_D0, DOT_DTYPE)
        do0 = _load_tile(do_ptrs + offs_d0[None, :], offs_m, offs_d0, SQ, D, CHECK_M, CHECK_D0, DOT_DTYPE)
        if HAS_TAIL:
            q1 = _load_tile(q_ptrs + offs_d1[None, :], offs_m, offs_d1, SQ, D, CHECK_M, CHECK_D1, DOT_DTYPE)
            do1 = _load_tile(do_ptrs + offs_d1[None, :], offs_m, offs_d1, SQ, D, CHECK_M, CHECK_D1, DOT_DTYPE)
        else:
            q1 = q0
            do1 = do0
        lse = _load_row(lse_base + offs_m, offs_m, SQ, float("inf"), CHECK_M)
        delta = _load_row(delta_base + offs_m, offs_m, SQ, 0.0, CHECK_M)
        dq0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
        dq1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        if CAUSAL:
            dq0, dq1 = _bwd_dq_inner(
                dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, s_ks, s_ks, offs_m, offs_d0, offs_d1,
                0, start_m, SK, D, qk_scale, BLOCK_M, False, False, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
            )
            hi = tl.minimum(start_m + BLOCK_N, SK)
            dq0, dq1 = _bwd_dq_inner(
                dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, s_ks, s_ks, offs_m, offs_d0, offs_d1,
                start_m, hi, SK, D, qk_scale, BLOCK_M, True, CHECK_N, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
            )
        else:
            dq0, dq1 = _bwd_dq_inner(
                dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, s_ks, s_ks, offs_m, offs_d0, offs_d1,
                0, SK, SK, D, qk_scale, BLOCK_M, False, CHECK_N, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
            )
        dq_ptrs = DQ + bh.to(tl.int64) * SQ * D + offs_m[:, None] * D
        _store_tile(dq_ptrs + offs_d0[None, :], dq0 * sm_scale, offs_m, offs_d0, SQ, D, CHECK_M, CHECK_D0)
        if HAS_TAIL:
            _store_tile(dq_ptrs + offs_d1[None, :], dq1 * sm_scale, offs_m, offs_d1, SQ, D, CHECK_M, CHECK_D1)


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch shape of one kernel.

    Forward: a program owns block_m queries and steps over keys by block_n (block_m % block_n == 0).
    Backward: a program owns block_n keys (dK, dV, stepping over queries by block_m), then block_n queries
    (dQ, stepping over keys by block_m), so block_n % block_m == 0.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def select_configs(head_dim: int, seq_len: int, dtype: torch.dtype, device: torch.device) -> dict[str, KernelConfig]:
    """Heuristic configs for the forward and the fused backward kernel, keyed 'fwd' and 'bwd'.

    The Hopper backward tiles are those on which the separate dKdV and dQ kernels agreed in the per-kernel
    sweep of benchmarks/results/attention_h200.json (H200); `benchmarks/attention.py --sweep` re-tunes them.
    """
    if device.type != "cuda":  # interpreter: small tiles so that tiny test shapes still span several blocks
        return {"fwd": KernelConfig(32, 16), "bwd": KernelConfig(16, 32)}
    major, _ = _capability(device)
    big = head_dim > 64
    if dtype == torch.float32 or major < 8:
        return {"fwd": KernelConfig(64, 32 if big else 64, 4, 2), "bwd": KernelConfig(16 if big else 32, 64, 4, 2)}
    if major >= 9:  # Hopper
        if head_dim < 128:  # 64, and 96 split as 64 + 32
            return {"fwd": KernelConfig(128 if big else 64, 64, 4, 4 if head_dim <= 64 else 3),
                    "bwd": KernelConfig(64, 64, 4, 3)}
        if seq_len >= 2048:
            return {"fwd": KernelConfig(128, 128, 8, 3), "bwd": KernelConfig(64, 128, 8, 3)}
        return {"fwd": KernelConfig(128, 64, 8, 3), "bwd": KernelConfig(64, 64, 4, 2)}
    return {"fwd": KernelConfig(128, 64, 8 if big else 4, 2), "bwd": KernelConfig(32, 64, 4, 2)}  # Ampere / Ada


AUTOTUNE_SPACE = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel, for IGPT_FLASH_AUTOTUNE=1
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 2)],
    "bwd": [(64, 64, 4, 3), (64, 64, 4, 2), (32, 128, 4, 3), (64, 128, 8, 3), (32, 128, 8, 2), (32, 64, 4, 4)],
}

_TUNED: dict[str, object] = {}


def _kernel(kind: str):
    return _fwd_kernel if kind == "fwd" else _bwd_kernel


def _tuned_kernel(kind: str):
    """The autotuned variant of the forward or backward kernel (built on first use)."""
    if kind not in _TUNED:
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                   for m, n, w, st in AUTOTUNE_SPACE[kind]]
        checks = {"CHECK_M": lambda a: a["SQ"] % a["BLOCK_N" if kind == "bwd" else "BLOCK_M"] != 0,
                  "CHECK_N": lambda a: a["SK"] % a["BLOCK_N"] != 0}
        key = ["SQ", "SK", "CAUSAL", "BLOCK_D0", "BLOCK_D1", "HAS_TAIL"]
        _TUNED[kind] = triton.autotune(configs=configs, key=key)(triton.heuristics(checks)(_kernel(kind)))
    return _TUNED[kind]


def tuned_configs() -> dict[str, str]:
    """The configs the autotuner picked so far, per kernel and tuning key, for benchmark reports."""
    return {f"{kind} {key}": str(cfg) for kind, k in _TUNED.items() for key, cfg in getattr(k, "cache", {}).items()}


def head_dim_split(d: int) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): a power-of-two chunk (at least 16) plus a power-of-two tail (0 if none) covering d."""
    block_d0 = max(16, 1 << (d.bit_length() - 1))
    rest = d - block_d0
    return block_d0, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


class _Launch:
    """One kernel's grid, trailing constexpr arguments and launch options, prepared once per problem shape.

    Constexprs go positionally after the runtime arguments (no keyword binding per call); with autotuning
    the tile sizes and edge checks are left to triton.autotune / triton.heuristics.
    """

    def __init__(self, kind: str, config: KernelConfig, autotune: bool, rows: int, bh: int, consts: tuple,
                 sq: int, sk: int):
        if autotune:
            block = "BLOCK_N" if kind == "bwd" else "BLOCK_M"
            self.fn = _tuned_kernel(kind)[lambda meta: (triton.cdiv(rows, meta[block]), bh)]
            self.consts, self.options = consts, {}
        else:
            block = config.block_n if kind == "bwd" else config.block_m
            self.fn = _kernel(kind)[(triton.cdiv(rows, block), bh)]
            check_m = sq % block != 0
            check_n = sk % config.block_n != 0
            self.consts = (*consts, config.block_m, config.block_n, check_m, check_n)
            self.options = {"num_warps": config.num_warps, "num_stages": config.num_stages}

    def __call__(self, *args):
        return self.fn(*args, *self.consts, **self.options)


@dataclass(frozen=True)
class _Plan:
    """Everything about a call that depends only on shapes, dtype, device and causality."""

    fwd: _Launch
    bwd: _Launch
    delta_grid: tuple[int, int]
    delta_block: tuple[int, int]
    buffer_dtype: torch.dtype  # _buffer_dtype
    h: int
    sq: int
    sk: int
    d: int


@functools.lru_cache(maxsize=256)
def _plan(q_shape: torch.Size, sk: int, dtype: torch.dtype, device: torch.device, causal: bool,
          autotune: bool, configs: tuple[KernelConfig, KernelConfig] | None = None) -> _Plan:
    """Launch plan for q of `q_shape` against `sk` keys; `configs` (fwd, bwd) overrides select_configs."""
    b, h, sq, d = q_shape
    interpret = device.type != "cuda"
    block_d0, block_d1 = head_dim_split(d)
    consts = (
        causal, block_d0, block_d0 > d, block_d1 > 0, max(block_d1, 16), block_d0 + block_d1 > d,
        tl.float32 if interpret else _TL_DTYPES[dtype], "ieee" if interpret or dtype == torch.float32 else "tf32",
    )
    if configs is None:
        cfg = select_configs(d, max(sq, sk), dtype, device)
        configs = (cfg["fwd"], cfg["bwd"])
    delta_block = 64 if not interpret else 32
    return _Plan(
        fwd=_Launch("fwd", configs[0], autotune, sq, b * h, consts, sq, sk),
        bwd=_Launch("bwd", configs[1], autotune, max(sq, sk), b * h, consts, sq, sk),
        delta_grid=(triton.cdiv(sq, delta_block), b * h),
        delta_block=(delta_block, max(16, triton.next_power_of_2(d))),
        buffer_dtype=_buffer_dtype(device, dtype),
        h=h, sq=sq, sk=sk, d=d,
    )


def _use_autotune(device: torch.device) -> bool:
    return device.type == "cuda" and not _INTERPRET and os.environ.get("IGPT_FLASH_AUTOTUNE", "0") == "1"


def _scale(q: torch.Tensor, sm_scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)


def _buffer_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """Dtype of O, dQ, dK, dV: float32 under the interpreter, whose float32→bfloat16 casts truncate."""
    return dtype if device.type == "cuda" else torch.float32


def _call_plan(q: torch.Tensor, k: torch.Tensor, causal: bool) -> _Plan:
    return _plan(q.shape, k.shape[2], q.dtype, q.device, causal, _use_autotune(q.device))


# ----------------------------------------------------------------------------------------------
# host side of forward and backward
# ----------------------------------------------------------------------------------------------


def _kv_layout(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v with one shared stride set and unit last stride (copies only when they differ)."""
    if k.stride() == v.stride() and k.stride(-1) == 1:
        return k, v
    return k.contiguous(), v.contiguous()


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(plan: _Plan, q, k, v, sm_scale: float):
    """Contiguous output (buffer dtype) and row log-sum-exp (base 2, float32, shape (B·H, SQ))."""
    o = torch.empty(q.shape, device=q.device, dtype=plan.buffer_dtype)
    lse = torch.empty((q.shape[0] * plan.h, plan.sq), device=q.device, dtype=torch.float32)
    sq_b, sq_h, sq_s, _ = q.stride()
    sk_b, sk_h, sk_s, _ = k.stride()
    plan.fwd(q, k, v, o, lse, sm_scale * _LOG2E, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, plan.h, plan.sq, plan.sk, plan.d)
    return o, lse


def _delta(plan: _Plan, o, lse, do) -> torch.Tensor:
    """rowsum(dO · O) per (batch·head, query), float32, laid out like `lse`."""
    delta = torch.empty_like(lse)
    sd_b, sd_h, sd_s, _ = do.stride()
    _bwd_preprocess_kernel[plan.delta_grid](o, do, delta, sd_b, sd_h, sd_s, plan.h, plan.sq, plan.d, *plan.delta_block)
    return delta


def _backward(plan: _Plan, q, k, v, o, lse, do, sm_scale: float, delta: torch.Tensor | None = None):
    """dQ, dK, dV (contiguous, buffer dtype): the delta preprocess (unless given), then one fused kernel."""
    delta = _delta(plan, o, lse, do) if delta is None else delta
    dq = torch.empty(q.shape, device=q.device, dtype=plan.buffer_dtype)
    dk = torch.empty(k.shape, device=q.device, dtype=plan.buffer_dtype)
    dv = torch.empty(k.shape, device=q.device, dtype=plan.buffer_dtype)
    sq_b, sq_h, sq_s, _ = q.stride()
    sk_b, sk_h, sk_s, _ = k.stride()
    sd_b, sd_h, sd_s, _ = do.stride()
    plan.bwd(q, k, v, do, lse, delta, dq, dk, dv, sm_scale * _LOG2E, sm_scale,
             sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sd_b, sd_h, sd_s, plan.h, plan.sq, plan.sk, plan.d)
    return dq, dk, dv


def backward_launcher(kind: str, q, k, v, do, causal: bool, config: KernelConfig | None = None,
                      sm_scale: float | None = None):
    """A zero-argument callable that launches only kernel `kind` ('fwd', 'delta' or 'bwd') with `config`.

    For benchmarks that time or tune one kernel alone (config None: the default; ignored for 'delta'): the
    forward and delta run once here (default configs) to give the log-sum-exp and delta the backward reads.
    """
    if kind not in ("fwd", "delta", "bwd"):
        raise UserError(f"unknown kernel kind {kind!r}; expected 'fwd', 'delta' or 'bwd'")
    sm_scale = _scale(q, sm_scale)
    k, v = _kv_layout(k, v)
    q, do = _last_dim_contiguous(q), _last_dim_contiguous(do)
    default = select_configs(q.shape[-1], max(q.shape[2], k.shape[2]), q.dtype, q.device)
    configs = (config or default["fwd"], default["bwd"]) if kind == "fwd" else (default["fwd"], config or default["bwd"])
    plan = _plan(q.shape, k.shape[2], q.dtype, q.device, causal, False, configs)
    o, lse = _forward(plan, q, k, v, sm_scale)
    delta = _delta(plan, o, lse, do)
    if kind == "fwd":
        return lambda: _forward(plan, q, k, v, sm_scale)
    if kind == "delta":
        return lambda: _delta(plan, o, lse, do)
    return lambda: _backward(plan, q, k, v, o, lse, do, sm_scale, delta)


@functools.lru_cache(maxsize=256)
def _validate(q_shape, k_shape, v_shape, dtypes, devices, causal: bool) -> None:
    """Raise ValueError unless flash_attention takes these inputs (cached: it depends only on its arguments)."""
    meta = [torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in zip((q_shape, k_shape, v_shape), dtypes)]
    check_attention_inputs(*meta, causal)
    if dtypes[0] not in _TL_DTYPES:
        raise UserError(f"flash_attention supports float16, bfloat16 and float32, got {dtypes[0]}")
    if not (devices[0] == devices[1] == devices[2]):
        raise UserError(f"q, k, v must be on one device, got {devices[0]}, {devices[1]}, {devices[2]}")
    if devices[0].type != "cuda" and not _INTERPRET:
        raise UserError(
            f"flash_attention runs on CUDA tensors (got {devices[0]}); set TRITON_INTERPRET=1 before importing "
            "kernels to run Triton's interpreter on the CPU"
        )
    if q_shape[-1] > 128:
        raise UserError(f"flash_attention supports head_dim up to 128, got {q_shape[-1]}")
    if 0 in q_shape or 0 in k_shape:
        raise UserError(f"flash_attention needs non-empty inputs, got q {tuple(q_shape)} and k {tuple(k_shape)}")


# ----------------------------------------------------------------------------------------------
# custom ops: torch.compile sees two opaque calls (with fake implementations for shapes) and never
# traces the validation and launch planning above (lru_cache), which run inside the implementations.
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("igpt::flash_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  sm_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(O in the buffer dtype, row log-sum-exp (B·H, SQ) base 2 in float32)."""
    _validate(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype), (q.device, k.device, v.device), causal)
    k, v = _kv_layout(k, v)
    return _forward(_call_plan(q, k, causal), _last_dim_contiguous(q), k, v, _scale(q, sm_scale))


@_attention_op.register_fake
def _attention_fake(q, k, v, causal, sm_scale):
    lse = q.new_empty((q.shape[0] * q.shape[1], q.shape[2]), dtype=torch.float32)
    return q.new_empty(q.shape, dtype=_buffer_dtype(q.device, q.dtype)), lse


@torch.library.custom_op("igpt::flash_attention_backward", mutates_args=())
def _attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                           lse: torch.Tensor, causal: bool,
                           sm_scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV in the buffer dtype, from the forward's inputs, O and log-sum-exp."""
    k, v = _kv_layout(k, v)
    return _backward(_call_plan(q, k, causal), _last_dim_contiguous(q), k, v, o, lse, _last_dim_contiguous(do),
                     _scale(q, sm_scale))


@_attention_backward_op.register_fake
def _attention_backward_fake(do, q, k, v, o, lse, causal, sm_scale):
    dtype = _buffer_dtype(q.device, q.dtype)
    return q.new_empty(q.shape, dtype=dtype), k.new_empty(k.shape, dtype=dtype), k.new_empty(k.shape, dtype=dtype)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, sm_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.sm_scale = causal, sm_scale
    ctx.mark_non_differentiable(lse)


def _attention_grad(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


_attention_op.register_autograd(_attention_grad, setup_context=_setup_context)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Fused softmax(q kᵀ · sm_scale) v on (B, H, S, D) tensors, like torch SDPA; differentiable in q, k, v.

    causal=True lets query i see keys 0..i (needs as many queries as keys); sm_scale defaults to
    1/sqrt(D). Tensors must be float16, bfloat16 or float32 on a CUDA device, or on the CPU with
    TRITON_INTERPRET=1 (Triton's interpreter, for tests). Any strides work; k and v are copied only when
    their strides differ, q only when its last dim is strided. Returns a contiguous tensor.
    The torch custom op ``torch.ops.igpt.flash_attention`` (and its backward) runs it, so torch.compile
    traces it without graph breaks.
    """
    o, _ = _attention_op(q, k, v, bool(causal), None if sm_scale is None else float(sm_scale))
    return o if o.dtype == q.dtype else o.to(q.dtype)
