"""The flash-attention custom ops: opcheck, their autograd against a float64 reference, and torch.compile
(fullgraph) of the kernel and of a model that uses it, matching eager with the ops called at run time.

On a CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) and compile with
backend="aot_eager"; on a GPU "inductor" runs too.
"""
from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from igpt.kernels.flash_attention import flash_attention
from igpt.kernels.reference import attention_reference
from igpt.pretrain.model import IGPT, IGPTConfig

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
COMPILE_BACKENDS = ["aot_eager", "inductor"] if DEVICE.type == "cuda" else ["aot_eager"]
OPS = {"igpt::flash_attention", "igpt::flash_attention_backward"}


def _randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)


def _qkv(shape_q, shape_k=None, dtype=torch.float32, requires_grad=True):
    shape_k = shape_k or shape_q
    return [_randn(*s, dtype=dtype, seed=i).requires_grad_(requires_grad) for i, s in enumerate((shape_q, shape_k, shape_k))]


@pytest.mark.parametrize("args", [
    lambda: (*_qkv((1, 3, 17, 24)), True, None),
    lambda: (*_qkv((2, 1, 5, 32), (2, 1, 19, 32), dtype=torch.bfloat16), False, 0.3),
    lambda: (*(t.transpose(1, 2) for t in _qkv((1, 9, 2, 16))), True, None),  # (B, S, H, D) buffers viewed
], ids=["fp32-causal-d24", "bf16-cross-scale", "strided"])
def test_opcheck_forward_and_backward(args):
    """Schema, fake implementation (static and dynamic shapes), autograd registration, AOT dispatch."""
    args = args()
    torch.library.opcheck(torch.ops.igpt.flash_attention.default, args)
    q, k, v, causal, scale = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    o, lse = torch.ops.igpt.flash_attention(q, k, v, causal, scale)
    do = torch.randn_like(o)
    torch.library.opcheck(torch.ops.igpt.flash_attention_backward.default, (do, q, k, v, o, lse, causal, scale))


def test_op_outputs_and_gradients_match_float64_reference():
    """The op's output, base-2 log-sum-exp and registered backward (through torch.ops) against float64 math."""
    q, k, v = _qkv((2, 2, 13, 40))
    scale = 0.2
    o, lse = torch.ops.igpt.flash_attention(q, k, v, True, scale)
    g = _randn(*o.shape, seed=9)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=True, sm_scale=scale)
    refs = (ref, *torch.autograd.grad(ref, (q64, k64, v64), g.double()))
    for name, x, r in zip(("out", "dq", "dk", "dv"), (o, dq, dk, dv), refs):
        assert x.dtype == torch.float32 and x.shape == r.shape, name
        torch.testing.assert_close(x.double(), r, rtol=1e-4, atol=1e-5, msg=name)
    scores = (q64 @ k64.transpose(-2, -1) * scale).masked_fill(torch.ones(13, 13, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(lse.double(), (scores.logsumexp(-1) / math.log(2)).flatten(0, 1).detach(),
                               rtol=1e-5, atol=1e-5)


class _Recorder:
    """A torch.compile backend that keeps Dynamo's graphs and hands them to `backend`."""

    def __init__(self, backend: str):
        self.backend, self.graphs = lookup_backend(backend), []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.backend(gm, example_inputs)

    def calls(self, target) -> int:
        return sum(node.target is target for gm in self.graphs for node in gm.graph.nodes)


def _profiled_ops(fn) -> set[str]:
    """Names of our custom ops that ran while calling fn."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()} & OPS


def _without_dynamo_warnings(fn):
    """fn(), asserting that Dynamo warned about nothing (such as tracing into lru_cache-wrapped functions)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    assert not [str(w.message) for w in caught if "_dynamo" in w.filename]
    return out


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_kernel_matches_eager_without_graph_breaks(backend):
    q, k, v = _qkv((1, 3, 21, 24))
    g = _randn(1, 3, 21, 24, seed=5)

    def step(fn):
        q1, k1, v1 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = fn(q1, k1, v1, causal=True)
        out.backward(g)
        return out.detach(), q1.grad, k1.grad, v1.grad

    recorder = _Recorder(backend)
    compiled = torch.compile(flash_attention, fullgraph=True, backend=recorder)
    assert _without_dynamo_warnings(lambda: _profiled_ops(lambda: step(compiled))) == OPS
    assert recorder.calls(torch.ops.igpt.flash_attention.default) == 1
    for x, y in zip(step(compiled), step(flash_attention)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_model_training_step_matches_eager(backend, record_property):
    """A 2-layer iGPT with the Triton backend: torch.compile(fullgraph) of its loss, forward and backward, equals
    eager; one graph, one op call per layer; the first call's time (compile and run) is reported."""
    torch.manual_seed(0)
    cfg = IGPTConfig(n_ctx=24, n_layer=2, n_head=2, n_embd=48, attn_backend="triton")  # head dim 24: 16 + tail
    eager = IGPT(cfg).to(DEVICE)
    torch.nn.init.normal_(eager.head.weight, std=0.5)
    model = IGPT(cfg).to(DEVICE)
    model.load_state_dict(eager.state_dict())
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    recorder = _Recorder(backend)
    loss_fn = torch.compile(model.loss, fullgraph=True, backend=recorder)

    def step(fn, module):
        loss = fn(tokens)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in module.named_parameters()}

    first_s, (loss, grads) = _without_dynamo_warnings(lambda: _timed(lambda: step(loss_fn, model)))
    model.zero_grad()
    steady_s, _ = _timed(lambda: step(loss_fn, model))
    assert _profiled_ops(lambda: step(loss_fn, model)) == OPS
    assert len(recorder.graphs) == 1 and recorder.calls(torch.ops.igpt.flash_attention.default) == cfg.n_layer
    ref_loss, ref_grads = step(eager.loss, eager)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    record_property("compile_s", first_s - steady_s)
    print(f"\ncompile ({backend}, {DEVICE.type}): first step {first_s:.2f} s, then {steady_s:.2f} s per step")
