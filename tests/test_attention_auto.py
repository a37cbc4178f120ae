"""attn_backend=auto: resolution from a measured table (nearest sequence length, fallbacks), the shipped table,
the benchmark's table writer, SDPA on a CPU and for decoding, one printed line per signature, torch.compile;
and the forced SDPA backends."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.registry import lookup_backend
from torch.nn.attention import SDPBackend, sdpa_kernel

import igpt.pretrain.attention as attention
from igpt.pretrain.attention_table import TABLE_ENV, auto_rule, dumps, load_entries, merge, pick, table_entries
from igpt.pretrain.model import IGPT, IGPTConfig, KVCache

REPO = Path(__file__).resolve().parent.parent
H200_RESULTS = REPO / "benchmarks" / "results" / "attention_h200.json"
SHIPPED_TABLE = REPO / "pretrain" / "attention_table.json"
GPU = "NVIDIA H200"


def _entry(d: int, s: int, best: str, causal: bool = True, device: str = GPU, dtype: str = "bfloat16") -> dict:
    ms = {"triton": 1.0, "sdpa_cudnn": 1.0, "sdpa_flash": 1.0, best: 0.5}
    return {"device": device, "dtype": dtype, "head_dim": d, "seq_len": s, "causal": causal, "best": best,
            "fwd_bwd_ms": ms, "shape": [8, 8, s, d], "source": "test"}


ENTRIES = [_entry(64, 256, "triton"), _entry(64, 1024, "sdpa_cudnn"), _entry(64, 4096, "sdpa_cudnn"),
           _entry(128, 1024, "sdpa_flash"), _entry(128, 2048, "triton"), _entry(128, 2048, "triton", causal=False)]


@pytest.mark.parametrize("d, causal, expected", [
    (64, True, ((640, "triton"), (None, "sdpa_cudnn"))),  # 1024 and 4096 agree: one segment
    (128, True, ((1536, "sdpa_flash"), (None, "triton"))),
    (128, False, ((None, "triton"),)),
    (96, True, ((None, "sdpa"),)),  # nothing measured at this head dim
])
def test_auto_rule_takes_the_nearest_measured_length(d, causal, expected):
    rule, why = auto_rule(ENTRIES, GPU, torch.bfloat16, d, causal)
    assert rule == expected
    assert why.startswith(expected[0][1])


@pytest.mark.parametrize("d, s, expected", [
    (64, 1, "triton"), (64, 256, "triton"), (64, 640, "triton"), (64, 641, "sdpa_cudnn"), (64, 9000, "sdpa_cudnn"),
    (128, 1536, "sdpa_flash"),  # equally near 1024 and 2048: the shorter decides
    (128, 1537, "triton"),
])
def test_pick_by_sequence_length(d, s, expected):
    assert pick(auto_rule(ENTRIES, GPU, torch.bfloat16, d, True)[0], s) == expected


@pytest.mark.parametrize("device, dtype", [("NVIDIA H100 80GB HBM3", torch.bfloat16), (GPU, torch.float16), (GPU, torch.float32)])
def test_unmeasured_device_or_dtype_falls_back_to_sdpa(device, dtype):
    assert auto_rule(ENTRIES, device, dtype, 64, True)[0] == ((None, "sdpa"),)
    assert auto_rule([], device, dtype, 64, True)[0] == ((None, "sdpa"),)


def test_shipped_table_is_derived_from_h200_results_and_picks_cudnn():
    """The shipped table is what the benchmark derives from its H200 report; cuDNN wins at every measured shape,
    so auto picks it at every iGPT signature (and the recipe's, head dim 64 at 1024)."""
    report = json.loads(H200_RESULTS.read_text())
    assert load_entries(SHIPPED_TABLE) == merge([], table_entries(report))["entries"]
    for d, s in [(64, 1024), (128, 1024), (96, 1024), (96, 2304), (128, 4096), (64, 4096), (128, 2048)]:
        rule, _ = auto_rule(load_entries(SHIPPED_TABLE), GPU, torch.bfloat16, d, True)
        assert pick(rule, s) == "sdpa_cudnn", (d, s)


def test_table_entries_keep_fastest_and_largest_shape():
    report = {"device": GPU, "dtype": "bfloat16", "causal": True, "torch": "t", "triton": "x", "date": "d", "results": {
        "(16, 8, 1024, 64)": {"ours": {"fwd_bwd_ms": 0.3}, "sdpa_cudnn": {"fwd_bwd_ms": 0.4},
                              "sdpa_flash": {"error": "OutOfResources"}, "configs": {}},
        "(64, 8, 1024, 64)": {"ours": {"fwd_bwd_ms": 1.6}, "sdpa_cudnn": {"fwd_bwd_ms": 1.5}},
        "(4, 24, 4096, 128)": {"ours": {"error": "boom"}},
    }}
    (entry,) = table_entries(report)
    assert entry["shape"] == [64, 8, 1024, 64] and entry["best"] == "sdpa_cudnn"
    assert entry["fwd_bwd_ms"] == {"sdpa_cudnn": 1.5, "triton": 1.6}


def test_benchmark_writes_the_table_and_keeps_other_devices(tmp_path):
    table = tmp_path / "attention_table.json"
    other = _entry(64, 1024, "triton", device="NVIDIA H100 80GB HBM3")
    stale = _entry(64, 1024, "triton")  # replaced by the H200 report's measurement
    table.write_text(dumps(merge([], [other, stale])))
    done = subprocess.run([sys.executable, "benchmarks/attention.py", "--table-from", str(H200_RESULTS), "--table",
                           str(table)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "auto: NVIDIA H200 bfloat16 D=64 S=1024 causal -> sdpa_cudnn; ours 0.65x its speed" in done.stdout
    entries = load_entries(table)
    assert other in entries and stale not in entries
    assert [e for e in entries if e["device"] == GPU] == load_entries(SHIPPED_TABLE)


def test_auto_on_a_gpu_reads_the_table_once_and_says_so(tmp_path, monkeypatch, capsys):
    """The GPU path without a GPU: the device name is the only thing asked of CUDA."""
    table = tmp_path / "table.json"
    table.write_text(dumps(merge([], ENTRIES)))
    monkeypatch.setenv(TABLE_ENV, str(table))
    monkeypatch.setattr(attention, "_AUTO_RULES", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPU)
    for _ in range(2):
        rule = attention._auto_rule(torch.device("cuda", 0), torch.bfloat16, 64, True)
    assert rule == ((640, "triton"), (None, "sdpa_cudnn"))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("attention auto [cuda:0, torch.bfloat16, head dim 64, causal]: "
                                                "triton up to S=640, sdpa_cudnn beyond")


def _tiny(backend: str, **kw) -> IGPT:
    torch.manual_seed(0)
    model = IGPT(IGPTConfig(n_ctx=16, n_layer=2, n_head=2, n_embd=32, attn_backend=backend, **kw))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def test_auto_on_cpu_is_sdpa_for_training_and_decoding(monkeypatch, capsys):
    monkeypatch.setattr(attention, "_AUTO_RULES", {})
    auto, sdpa = _tiny("auto"), _tiny("sdpa")
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(auto(tokens).logits, sdpa(tokens).logits, rtol=0, atol=0)
    caches = [KVCache(2, 16) for _ in range(2)]
    for end in (5, 6, 7):  # a prefix of 5 (self-attention), then one token at a time (decoding)
        torch.testing.assert_close(auto.decode(tokens, caches[0], end), sdpa.decode(tokens, caches[1], end),
                                   rtol=0, atol=0)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["attention auto [cpu, torch.float32, head dim 16, causal]: sdpa (not a GPU)"]


class _Recorder:
    def __init__(self):
        self.graphs, self.backend = [], lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.backend(gm, example_inputs)


def test_auto_under_compile_follows_the_rule_per_length(monkeypatch):
    """With a rule of triton up to 12 positions and SDPA beyond, torch.compile(fullgraph) traces our op at 12 and
    SDPA at 16 (a guard on the length, no graph break), and matches eager."""
    monkeypatch.setattr(attention, "_AUTO_RULES", {(torch.device("cpu"), torch.float32, 16, True):
                                                   ((12, "triton"), (None, "sdpa"))})
    model = _tiny("auto")
    recorder = _Recorder()
    compiled = torch.compile(model.loss, fullgraph=True, backend=recorder)
    for length, ours in ((16, False), (12, True)):
        tokens = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(length))
        torch.testing.assert_close(compiled(tokens), model.loss(tokens), rtol=1e-5, atol=1e-6)
        ops = [n for n in recorder.graphs[-1].graph.nodes if n.target is torch.ops.igpt.flash_attention.default]
        assert len(ops) == (2 if ours else 0), length


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_gpu_runs_the_table_choice_eager_and_compiled():
    """Head dim 64 at 1024 positions in bf16: auto equals the backend the table names (cuDNN on an H200), and
    torch.compile(fullgraph, inductor) of its loss (a forced SDPA kernel or our op inside) matches eager."""
    name = pick(attention._auto_rule(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, 64, True), 1024)
    models = {}
    for backend in ("auto", name):
        torch.manual_seed(0)
        models[backend] = IGPT(IGPTConfig(n_ctx=1024, n_layer=2, n_head=2, n_embd=128, attn_backend=backend)).cuda()
    tokens = torch.randint(0, 512, (4, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = {b: m(tokens).logits for b, m in models.items()}
        torch.testing.assert_close(logits["auto"], logits[name], rtol=0, atol=0)
        compiled = torch.compile(models["auto"].loss, fullgraph=True)(tokens)
        torch.testing.assert_close(compiled, models["auto"].loss(tokens), rtol=2e-2, atol=2e-2)


def test_named_sdpa_backends_are_forced():
    """sdpa_flash runs SDPA's flash kernel (CPU has one); sdpa_cudnn never falls back to another kernel."""
    q, k, v = (torch.randn(1, 2, 9, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = attention.attention_backend("sdpa_flash")(q, k, v, causal=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="No viable backend"):
        attention.attention_backend("sdpa_cudnn")(q, k, v, causal=True)
