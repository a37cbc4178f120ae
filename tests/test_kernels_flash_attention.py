"""Triton flash attention against a float64 reference: outputs and dQ, dK, dV, on odd shapes and dtypes.

On a CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay tiny;
on a GPU the same tests run compiled, plus GPU-sized shapes.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from igpt.kernels.flash_attention import flash_attention
from igpt.kernels.reference import attention_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

# Relative-error ceilings (‖x − ref‖ / ‖ref‖) per dtype, and the slack allowed over SDPA's own error.
MAX_REL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
SLACK = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ (the plain norm of the difference where ref is all zeros)."""
    diff = (x.double() - ref).norm().item()
    scale = ref.norm().item()
    return diff / scale if scale > 0 else diff


def _inputs(shape_q, shape_k, dtype, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(shape_q, generator=gen)
    k = torch.randn(shape_k, generator=gen)
    v = torch.randn(shape_k, generator=gen)
    g = torch.randn(shape_q, generator=gen)
    return [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, g)]


def _forward_backward(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)
    return out.detach(), q.grad, k.grad, v.grad


def _check_against_reference(shape, dtype, causal, *, shape_k=None, sm_scale=None, seed=0):
    """Ours and SDPA in `dtype` against float64 math on the same (rounded) inputs."""
    q, k, v, g = _inputs(shape, shape_k or shape, dtype, seed)
    ref = _forward_backward(
        lambda a, b, c: attention_reference(a, b, c, causal=causal, sm_scale=sm_scale), *(t.double() for t in (q, k, v, g))
    )
    ours = _forward_backward(lambda a, b, c: flash_attention(a, b, c, causal=causal, sm_scale=sm_scale), q, k, v, g)
    sdpa = _forward_backward(
        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal, scale=sm_scale), q, k, v, g
    )
    for name, x, s, r in zip(("out", "dq", "dk", "dv"), ours, sdpa, ref):
        assert x.dtype == dtype and x.shape == r.shape, name
        assert torch.isfinite(x).all(), f"{name}: non-finite values"
        err, sdpa_err = _rel(x, r), _rel(s, r)
        assert err < MAX_REL[dtype], f"{name}: rel err {err:.2e} over {MAX_REL[dtype]:.0e} (SDPA {sdpa_err:.2e})"
        assert err <= 2 * sdpa_err + SLACK[dtype], f"{name}: rel err {err:.2e} far over SDPA's {sdpa_err:.2e}"


# (B, H, S, D): length 1, lengths that are not multiples of any block, head dims 96 (64 + 32), 24 (16 + a
# masked 16) and 8 (one masked 16), B·H = 3 or 5.
CPU_CASES = [
    ((1, 3, 1, 16), torch.float32),
    ((1, 3, 17, 32), torch.float32),
    ((5, 1, 33, 16), torch.float32),
    ((1, 3, 70, 32), torch.float32),
    ((3, 1, 40, 96), torch.float32),
    ((1, 3, 17, 24), torch.float32),
    ((1, 5, 9, 8), torch.float32),
    ((1, 3, 17, 32), torch.bfloat16),
    ((5, 1, 33, 16), torch.bfloat16),
    ((3, 1, 40, 96), torch.bfloat16),
    ((1, 3, 1, 16), torch.float16),
    ((1, 3, 70, 32), torch.float16),
]
GPU_CASES = [
    ((2, 4, 1024, 64), torch.bfloat16),
    ((1, 4, 1024, 128), torch.float16),
    ((1, 3, 2304, 96), torch.bfloat16),
    ((2, 3, 1000, 96), torch.float16),
    ((1, 2, 4096, 128), torch.bfloat16),
    ((1, 5, 333, 128), torch.float32),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape,dtype", CPU_CASES, ids=lambda x: str(x).replace("torch.", "").replace(" ", ""))
def test_matches_reference(shape, dtype, causal):
    _check_against_reference(shape, dtype, causal, seed=hash((shape, causal)) % 1000)


@pytest.mark.skipif(not ON_GPU, reason="GPU-sized shapes need a GPU")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape,dtype", GPU_CASES, ids=lambda x: str(x).replace("torch.", "").replace(" ", ""))
def test_matches_reference_gpu_sizes(shape, dtype, causal):
    _check_against_reference(shape, dtype, causal, seed=7)


def test_more_keys_than_queries_and_custom_scale():
    """Non-causal cross attention (5 queries, 33 keys) with a non-default softmax scale."""
    _check_against_reference((1, 3, 5, 32), torch.float32, False, shape_k=(1, 3, 33, 32), sm_scale=0.3)


def test_strided_inputs_match_contiguous():
    """q, k, v as (B, S, H, D) buffers viewed as (B, H, S, D), the layout a fused QKV projection gives."""
    b, s, h, d = 1, 19, 3, 32
    qkv = torch.randn(b, s, 3, h, d, device=DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    g = torch.randn(b, h, s, d, device=DEVICE)
    strided = _forward_backward(flash_attention, q, k, v, g)
    dense = _forward_backward(flash_attention, *(t.contiguous() for t in (q, k, v)), g)
    for x, y in zip(strided, dense):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_causal_property():
    """Changing key/value t changes no output before t."""
    q, k, v, _ = _inputs((1, 3, 20, 16), (1, 3, 20, 16), torch.float32, seed=3)
    out = flash_attention(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 11:] += 1.0
    v2[:, :, 11:] -= 2.0
    out2 = flash_attention(q, k2, v2)
    torch.testing.assert_close(out[:, :, :11], out2[:, :, :11], rtol=0, atol=0)
    assert (out[:, :, 11:] - out2[:, :, 11:]).abs().amax() > 1e-3


def test_reference_matches_sdpa_in_float64():
    q, k, v, _ = _inputs((2, 3, 9, 16), (2, 3, 9, 16), torch.float64, seed=4)
    for causal in (True, False):
        torch.testing.assert_close(
            attention_reference(q, k, v, causal=causal), F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        )
    scale = 1 / math.sqrt(16)
    torch.testing.assert_close(attention_reference(q, k, v, sm_scale=scale), attention_reference(q, k, v))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(3, 5, 16),) * 3, "batch, heads, seq, head_dim"),
        (lambda: (torch.randn(1, 2, 5, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)), "as many queries"),
        (lambda: (torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 8)), "same shape"),
        (lambda: (torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16).half(), torch.randn(1, 2, 5, 16)), "share a dtype"),
        (lambda: (torch.randn(1, 2, 5, 16).double(),) * 3, "float16, bfloat16 and float32"),
        (lambda: (torch.randn(1, 2, 0, 16),) * 3, "non-empty"),
        (lambda: (torch.randn(1, 2, 5, 160),) * 3, "head_dim up to 128"),
    ],
)
def test_bad_inputs_raise(make, match):
    q, k, v = (t.to(DEVICE) for t in make())
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, causal=True)


def test_strided_grad_and_mixed_kv_layouts():
    """k contiguous, v and dO (B, S, H, D) buffers viewed as (B, H, S, D): the strides differ from q's."""
    b, s, h, d = 1, 21, 3, 32
    q, k, _, _ = _inputs((b, h, s, d), (b, h, s, d), torch.float32, seed=5)
    v = torch.randn(b, s, h, d, device=DEVICE).transpose(1, 2)
    g = torch.randn(b, s, h, d, device=DEVICE).transpose(1, 2)
    ours = _forward_backward(flash_attention, q, k, v, g)
    ref = _forward_backward(lambda a, c, e: attention_reference(a, c, e, causal=True), *(t.double() for t in (q, k, v, g)))
    for name, x, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert _rel(x, r) < MAX_REL[torch.float32], name


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_backward_tiles_agree(causal):
    """The fused backward gives the same dQ, dK, dV for every (step, block) tile pair, masked edges included."""
    fa = importlib.import_module("igpt.kernels.flash_attention")
    q, k, v, g = _inputs((1, 2, 70, 32), (1, 2, 70, 32), torch.float32, seed=6)
    grads = [fa.backward_launcher("bwd", q, k, v, g, causal, fa.KernelConfig(m, n))() for m, n in ((16, 32), (16, 64), (32, 32))]
    for other in grads[1:]:
        for x, y in zip(grads[0], other):
            torch.testing.assert_close(x, y, rtol=1e-4 if ON_GPU else 1e-5, atol=1e-4 if ON_GPU else 1e-5)  # tf32 on a GPU
