"""Triton flash attention, forward and backward (FlashAttention-2 style), on (B, H, S, D) tensors.

Forward: one program per (query block, batch·head) streams key/value blocks with an online softmax
(exp2, scale folded with log2 e) and stores the output and the row log-sum-exp (base 2). Causal
attention runs the blocks left of the diagonal without masks and only the diagonal block masked.
Backward: `delta = rowsum(dO·O)`, then one kernel per key block accumulates dK and dV over query
blocks, and one kernel per query block accumulates dQ over key blocks (no atomics).

Head dims that are not powers of two (iGPT-L's 96) are split into a power-of-two chunk and a tail
(64 + 32), so no matrix product runs over padding; any sequence length works (masked edges,
specialised away when the length divides the blocks).
Under TRITON_INTERPRET=1 (CPU tests) every tile is computed in float32, because the interpreter's
bfloat16 arithmetic is wrong; on a GPU the matrix products take the input dtype with float32 accumulators.
Configs come from a small table (select_configs); IGPT_FLASH_AUTOTUNE=1 autotunes a short list instead (GPU only).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.reference import check_attention_inputs

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
    Q, K, V, O, LSE, qk_scale,
    s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_ob, s_oh, s_os,
    H, SQ, SK, D,
    CAUSAL: tl.constexpr, BLOCK_D0: tl.constexpr, CHECK_D0: tl.constexpr, HAS_TAIL: tl.constexpr,
    BLOCK_D1: tl.constexpr, CHECK_D1: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
):
    # Heaviest (causal) query blocks of each head first.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    k_base = K + off_b * s_kb + off_h * s_kh
    v_base = V + off_b * s_vb + off_h * s_vh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    q_ptrs = Q + off_b * s_qb + off_h * s_qh + offs_m[:, None] * s_qs
    o_ptrs = O + off_b * s_ob + off_h * s_oh + offs_m[:, None] * s_os
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
            acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, s_ks, s_vs, offs_m, offs_d0, offs_d1, 0, lo, SK, D, qk_scale,
            BLOCK_N, False, False, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
        )
        hi = tl.minimum(lo + BLOCK_M, SK)
        acc0, acc1, l_i, m_i = _fwd_inner(
            acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, s_ks, s_vs, offs_m, offs_d0, offs_d1, lo, hi, SK, D, qk_scale,
            BLOCK_N, True, CHECK_N, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
        )
    else:
        acc0, acc1, l_i, m_i = _fwd_inner(
            acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, s_ks, s_vs, offs_m, offs_d0, offs_d1, 0, SK, SK, D, qk_scale,
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
def _bwd_preprocess_kernel(
    O, DO, DELTA, s_ob, s_oh, s_os, s_db, s_dh, s_ds, H, SQ, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[bh, i] = sum_d O[i, d] · dO[i, d], in float32."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < SQ) & (offs_d[None, :] < D)
    o = tl.load(O + off_b * s_ob + off_h * s_oh + offs_m[:, None] * s_os + offs_d[None, :], mask=mask, other=0.0)
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


@triton.jit(do_not_specialize=["H"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale,
    s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_dob, s_doh, s_dos,
    s_dkb, s_dkh, s_dks, s_dvb, s_dvh, s_dvs,
    H, SQ, SK, D,
    CAUSAL: tl.constexpr, BLOCK_D0: tl.constexpr, CHECK_D0: tl.constexpr, HAS_TAIL: tl.constexpr,
    BLOCK_D1: tl.constexpr, CHECK_D1: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
):
    start_n = tl.program_id(0)  # block 0 sees every query under the causal mask: the heaviest go first
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    q_base = Q + off_b * s_qb + off_h * s_qh
    do_base = DO + off_b * s_dob + off_h * s_doh
    lse_base = LSE + bh.to(tl.int64) * SQ
    delta_base = DELTA + bh.to(tl.int64) * SQ

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    k_ptrs = K + off_b * s_kb + off_h * s_kh + offs_n[:, None] * s_ks
    v_ptrs = V + off_b * s_vb + off_h * s_vh + offs_n[:, None] * s_vs
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
        lo = start_n * BLOCK_N
        hi = tl.minimum(lo + BLOCK_N, SQ)
        dk0, dk1, dv0, dv1 = _bwd_dkdv_inner(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base, s_qs, s_dos,
            offs_n, offs_d0, offs_d1, lo, hi, SQ, D, qk_scale,
            BLOCK_M, True, CHECK_M, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
        )
        dk0, dk1, dv0, dv1 = _bwd_dkdv_inner(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base, s_qs, s_dos,
            offs_n, offs_d0, offs_d1, lo + BLOCK_N, SQ, SQ, D, qk_scale,
            BLOCK_M, False, CHECK_M, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
        )
    else:
        dk0, dk1, dv0, dv1 = _bwd_dkdv_inner(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base, s_qs, s_dos,
            offs_n, offs_d0, offs_d1, 0, SQ, SQ, D, qk_scale,
            BLOCK_M, False, CHECK_M, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
        )
    dk_ptrs = DK + off_b * s_dkb + off_h * s_dkh + offs_n[:, None] * s_dks
    dv_ptrs = DV + off_b * s_dvb + off_h * s_dvh + offs_n[:, None] * s_dvs
    _store_tile(dk_ptrs + offs_d0[None, :], dk0 * sm_scale, offs_n, offs_d0, SK, D, CHECK_N, CHECK_D0)
    _store_tile(dv_ptrs + offs_d0[None, :], dv0, offs_n, offs_d0, SK, D, CHECK_N, CHECK_D0)
    if HAS_TAIL:
        _store_tile(dk_ptrs + offs_d1[None, :], dk1 * sm_scale, offs_n, offs_d1, SK, D, CHECK_N, CHECK_D1)
        _store_tile(dv_ptrs + offs_d1[None, :], dv1, offs_n, offs_d1, SK, D, CHECK_N, CHECK_D1)


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
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale,
    s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_dob, s_doh, s_dos, s_dqb, s_dqh, s_dqs,
    H, SQ, SK, D,
    CAUSAL: tl.constexpr, BLOCK_D0: tl.constexpr, CHECK_D0: tl.constexpr, HAS_TAIL: tl.constexpr,
    BLOCK_D1: tl.constexpr, CHECK_D1: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
):
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    k_base = K + off_b * s_kb + off_h * s_kh
    v_base = V + off_b * s_vb + off_h * s_vh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    q_ptrs = Q + off_b * s_qb + off_h * s_qh + offs_m[:, None] * s_qs
    do_ptrs = DO + off_b * s_dob + off_h * s_doh + offs_m[:, None] * s_dos
    q0 = _load_tile(q_ptrs + offs_d0[None, :], offs_m, offs_d0, SQ, D, CHECK_M, CHECK_D0, DOT_DTYPE)
    do0 = _load_tile(do_ptrs + offs_d0[None, :], offs_m, offs_d0, SQ, D, CHECK_M, CHECK_D0, DOT_DTYPE)
    if HAS_TAIL:
        q1 = _load_tile(q_ptrs + offs_d1[None, :], offs_m, offs_d1, SQ, D, CHECK_M, CHECK_D1, DOT_DTYPE)
        do1 = _load_tile(do_ptrs + offs_d1[None, :], offs_m, offs_d1, SQ, D, CHECK_M, CHECK_D1, DOT_DTYPE)
    else:
        q1 = q0
        do1 = do0
    lse = _load_row(LSE + bh.to(tl.int64) * SQ + offs_m, offs_m, SQ, float("inf"), CHECK_M)
    delta = _load_row(DELTA + bh.to(tl.int64) * SQ + offs_m, offs_m, SQ, 0.0, CHECK_M)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    if CAUSAL:
        lo = start_m * BLOCK_M
        dq0, dq1 = _bwd_dq_inner(
            dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, s_ks, s_vs, offs_m, offs_d0, offs_d1, 0, lo, SK, D,
            qk_scale, BLOCK_N, False, False, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
        )
        hi = tl.minimum(lo + BLOCK_M, SK)
        dq0, dq1 = _bwd_dq_inner(
            dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, s_ks, s_vs, offs_m, offs_d0, offs_d1, lo, hi, SK, D,
            qk_scale, BLOCK_N, True, CHECK_N, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
        )
    else:
        dq0, dq1 = _bwd_dq_inner(
            dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, s_ks, s_vs, offs_m, offs_d0, offs_d1, 0, SK, SK, D,
            qk_scale, BLOCK_N, False, CHECK_N, CHECK_D0, HAS_TAIL, CHECK_D1, DOT_DTYPE, PRECISION,
        )
    dq_ptrs = DQ + off_b * s_dqb + off_h * s_dqh + offs_m[:, None] * s_dqs
    _store_tile(dq_ptrs + offs_d0[None, :], dq0 * sm_scale, offs_m, offs_d0, SQ, D, CHECK_M, CHECK_D0)
    if HAS_TAIL:
        _store_tile(dq_ptrs + offs_d1[None, :], dq1 * sm_scale, offs_m, offs_d1, SQ, D, CHECK_M, CHECK_D1)


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch shape of one kernel. Forward and dQ need block_m % block_n == 0, dKdV the reverse."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.num_warps, "num_stages": self.num_stages}


def select_configs(head_dim: int, seq_len: int, dtype: torch.dtype, device: torch.device) -> dict[str, KernelConfig]:
    """Heuristic configs for the forward, dKdV and dQ kernels, keyed 'fwd', 'dkdv', 'dq'.

    For dKdV, block_n is the key block a program owns and block_m the query block it steps by; for
    forward and dQ it is the other way round. The Hopper backward choices at S=1024 are the fastest of the
    per-kernel sweep in benchmarks/results/attention_h200.json (`benchmarks/attention.py --sweep`, H200).
    """
    if device.type != "cuda":  # interpreter: small tiles so that tiny test shapes still span several blocks
        return {"fwd": KernelConfig(32, 16), "dkdv": KernelConfig(16, 32), "dq": KernelConfig(32, 16)}
    major, _ = torch.cuda.get_device_capability(device)
    big = head_dim > 64
    if dtype == torch.float32 or major < 8:
        return {
            "fwd": KernelConfig(64, 32 if big else 64, 4, 2),
            "dkdv": KernelConfig(16 if big else 32, 64, 4, 2),
            "dq": KernelConfig(64, 16 if big else 32, 4, 2),
        }
    if major >= 9:  # Hopper
        if head_dim <= 64:
            return {"fwd": KernelConfig(64, 64, 4, 4), "dkdv": KernelConfig(64, 64, 4, 3), "dq": KernelConfig(64, 64, 4, 3)}
        if head_dim < 128:  # split head dim (96 = 64 + 32)
            return {"fwd": KernelConfig(128, 64, 4, 3), "dkdv": KernelConfig(64, 64, 4, 3), "dq": KernelConfig(64, 64, 4, 3)}
        if seq_len >= 2048:
            return {"fwd": KernelConfig(128, 128, 8, 3), "dkdv": KernelConfig(64, 128, 8, 3), "dq": KernelConfig(128, 64, 8, 3)}
        # S=1024 sweep, each kernel alone: dKdV 0.172 ms vs 0.200 for (64, 128, 8, 2); dQ 0.137 vs 0.172 for (128, 64, 8, 2)
        return {"fwd": KernelConfig(128, 64, 8, 3), "dkdv": KernelConfig(64, 64, 4, 2), "dq": KernelConfig(128, 32, 8, 3)}
    return {  # Ampere / Ada: less shared memory
        "fwd": KernelConfig(128, 64, 8 if big else 4, 2),
        "dkdv": KernelConfig(32, 64, 4, 2),
        "dq": KernelConfig(64, 32, 4, 2),
    }


AUTOTUNE_SPACE = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel, for IGPT_FLASH_AUTOTUNE=1
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 2)],
    "dkdv": [(32, 128, 4, 4), (64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)],
    "dq": [(128, 32, 4, 4), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
}


def _autotune_space(kind: str) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in AUTOTUNE_SPACE[kind]
    ]


_TUNED: dict[str, object] = {}


def _kernel(kind: str):
    return {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}[kind]


def _edge_checks(args: dict) -> dict:
    """CHECK_M / CHECK_N: whether the sequence lengths leave partial blocks (masks compiled in only then)."""
    return {"CHECK_M": args["SQ"] % args["BLOCK_M"] != 0, "CHECK_N": args["SK"] % args["BLOCK_N"] != 0}


def _tuned_kernel(kind: str):
    """The autotuned variant of one kernel (built on first use)."""
    if kind not in _TUNED:
        checks = {
            "CHECK_M": lambda a: _edge_checks(a)["CHECK_M"],
            "CHECK_N": lambda a: _edge_checks(a)["CHECK_N"],
        }
        key = ["SQ", "SK", "CAUSAL", "BLOCK_D0", "BLOCK_D1", "HAS_TAIL"]
        _TUNED[kind] = triton.autotune(configs=_autotune_space(kind), key=key)(triton.heuristics(checks)(_kernel(kind)))
    return _TUNED[kind]


def _use_autotune(device: torch.device) -> bool:
    return device.type == "cuda" and not _INTERPRET and os.environ.get("IGPT_FLASH_AUTOTUNE", "0") == "1"


def _launch(kind: str, config: KernelConfig, autotune: bool, bh: int, args: tuple, consts: dict, sq: int, sk: int):
    """Launch one kernel with `config` (or its autotuned variant) on the grid (row blocks, batch·heads).

    Rows are query blocks for forward and dQ, key blocks for dKdV; batch·heads is the slow grid axis, so the
    blocks of one head run together (their K/V or Q/dO stay in L2) and each head's heaviest blocks start first.
    """
    rows = sk if kind == "dkdv" else sq
    if autotune:
        tuned = _tuned_kernel(kind)
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_N" if kind == "dkdv" else "BLOCK_M"]), bh)  # noqa: E731
        return tuned[grid](*args, **consts)
    block = config.block_n if kind == "dkdv" else config.block_m
    checks = _edge_checks({"SQ": sq, "SK": sk, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n})
    return _kernel(kind)[(triton.cdiv(rows, block), bh)](*args, **consts, **checks, **config.meta())


def tuned_configs() -> dict[str, str]:
    """The configs the autotuner picked so far, per kernel and tuning key, for benchmark reports."""
    return {f"{kind} {key}": str(cfg) for kind, k in _TUNED.items() for key, cfg in getattr(k, "cache", {}).items()}


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _out_buffer(like: torch.Tensor) -> torch.Tensor:
    """A contiguous output buffer; float32 under the interpreter, whose float32→bfloat16 casts truncate."""
    dtype = torch.float32 if like.device.type != "cuda" else like.dtype
    return torch.empty(like.shape, device=like.device, dtype=dtype)


def head_dim_split(d: int) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): a power-of-two chunk (at least 16) plus a power-of-two tail (0 if none) covering d."""
    block_d0 = max(16, 1 << (d.bit_length() - 1))
    rest = d - block_d0
    return block_d0, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def _common_consts(q: torch.Tensor, causal: bool) -> dict:
    interpret = q.device.type != "cuda"
    d = q.shape[-1]
    block_d0, block_d1 = head_dim_split(d)
    return {
        "CAUSAL": causal,
        "BLOCK_D0": block_d0,
        "CHECK_D0": block_d0 > d,
        "HAS_TAIL": block_d1 > 0,
        "BLOCK_D1": max(block_d1, 16),
        "CHECK_D1": block_d0 + block_d1 > d,
        "DOT_DTYPE": tl.float32 if interpret else _TL_DTYPES[q.dtype],
        "PRECISION": "ieee" if interpret or q.dtype == torch.float32 else "tf32",
    }


def _fwd_args(q, k, v, o, lse, sm_scale: float) -> tuple:
    return (
        q, k, v, o, lse, sm_scale * _LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        q.shape[1], q.shape[2], k.shape[2], q.shape[3],
    )


def _dkdv_args(q, k, v, do, lse, delta, dk, dv, sm_scale: float) -> tuple:
    return (
        q, k, v, do, lse, delta, dk, dv, sm_scale * _LOG2E, sm_scale,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        q.shape[1], q.shape[2], k.shape[2], q.shape[3],
    )


def _dq_args(q, k, v, do, lse, delta, dq, sm_scale: float) -> tuple:
    return (
        q, k, v, do, lse, delta, dq, sm_scale * _LOG2E, sm_scale,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        q.shape[1], q.shape[2], k.shape[2], q.shape[3],
    )


def _forward(q, k, v, causal: bool, sm_scale: float, cfg: KernelConfig, autotune: bool):
    """Output and row log-sum-exp (base 2, float32, shape (B·H, SQ))."""
    b, h, sq, _ = q.shape
    o = _out_buffer(q)
    lse = torch.empty((b * h, sq), device=q.device, dtype=torch.float32)
    _launch("fwd", cfg, autotune, b * h, _fwd_args(q, k, v, o, lse, sm_scale), _common_consts(q, causal), sq, k.shape[2])
    return o.to(q.dtype), lse


def _delta(o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """rowsum(dO · O) per (batch·head, query), float32, laid out like `lse`."""
    b, h, sq, d = o.shape
    delta = torch.empty_like(lse)
    block = 64 if o.device.type == "cuda" else 32
    _bwd_preprocess_kernel[(triton.cdiv(sq, block), b * h)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], h, sq, d, BLOCK_M=block, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )
    return delta


def backward_launcher(kind: str, q, k, v, do, causal: bool, config: KernelConfig, sm_scale: float | None = None):
    """A zero-argument callable that launches only kernel `kind` ('fwd', 'delta', 'dkdv' or 'dq') with `config`.

    For benchmarks that time or tune one kernel alone: the forward runs once here (default configs) to give
    the log-sum-exp and delta the backward kernels read. The callable returns Triton's compiled kernel.
    """
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    consts = _common_consts(q, causal)
    o, lse = _forward(q, k, v, causal, sm_scale, select_configs(q.shape[-1], max(sq, sk), q.dtype, q.device)["fwd"], False)
    delta = _delta(o, do, lse)
    if kind == "fwd":
        args = _fwd_args(q, k, v, _out_buffer(q), torch.empty_like(lse), sm_scale)
    elif kind == "delta":
        return lambda: _delta(o, do, lse)
    elif kind == "dkdv":
        args = _dkdv_args(q, k, v, do, lse, delta, _out_buffer(k), _out_buffer(v), sm_scale)
    elif kind == "dq":
        args = _dq_args(q, k, v, do, lse, delta, _out_buffer(q), sm_scale)
    else:
        raise ValueError(f"unknown kernel kind {kind!r}; expected 'fwd', 'delta', 'dkdv' or 'dq'")
    return lambda: _launch(kind, config, False, b * h, args, consts, sq, sk)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, sm_scale: float):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        cfg = select_configs(q.shape[-1], max(q.shape[2], k.shape[2]), q.dtype, q.device)
        o, lse = _forward(q, k, v, causal, sm_scale, cfg["fwd"], _use_autotune(q.device))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = _last_dim_contiguous(do)
        b, h, sq, d = q.shape
        sk = k.shape[2]
        cfg = select_configs(d, max(sq, sk), q.dtype, q.device)
        autotune = _use_autotune(q.device)
        consts = _common_consts(q, ctx.causal)
        delta = _delta(o, do, lse)
        dq, dk, dv = _out_buffer(q), _out_buffer(k), _out_buffer(v)
        _launch("dkdv", cfg["dkdv"], autotune, b * h, _dkdv_args(q, k, v, do, lse, delta, dk, dv, ctx.sm_scale), consts, sq, sk)
        _launch("dq", cfg["dq"], autotune, b * h, _dq_args(q, k, v, do, lse, delta, dq, ctx.sm_scale), consts, sq, sk)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


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
    TRITON_INTERPRET=1 (Triton's interpreter, for tests).
    """
    check_attention_inputs(q, k, v, causal)
    if q.dtype not in _TL_DTYPES:
        raise ValueError(f"flash_attention supports float16, bfloat16 and float32, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"flash_attention runs on CUDA tensors (got {q.device}); set TRITON_INTERPRET=1 before importing "
            "kernels to run Triton's interpreter on the CPU"
        )
    if q.shape[-1] > 128:
        raise ValueError(f"flash_attention supports head_dim up to 128, got {q.shape[-1]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"flash_attention needs non-empty inputs, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    return _FlashAttention.apply(q, k, v, causal, scale)
