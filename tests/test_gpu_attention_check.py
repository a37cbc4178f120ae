"""scripts/gpu_attention_check.sh without a GPU (SMOKE=1): every phase runs on the CPU and leaves its files."""
from __future__ import annotations

import json
import subprocess

import pytest
from isolated_venv import ONLY_PYTHONPATH, REPO, make_venv

from igpt.pretrain.attention_table import load_entries

FILES = {"tests.log", "bench.log", "attention.json", "attention_table.json", "compile.log", "compile_triton.json",
         "compile_auto.json"}


@pytest.mark.slow
def test_smoke_run_writes_every_file(tmp_path):
    # As on a GPU machine: python3 (the venv's, first on PATH) has the dependencies but no igpt; only the script's
    # PYTHONPATH, the checkout, leads to it.
    venv = make_venv(tmp_path / "venv")
    out = tmp_path / "out"
    env = venv.env(**ONLY_PYTHONPATH, SMOKE="1", OUT=str(out), TESTS="tests/test_attention_auto.py -k pick")
    done = subprocess.run(["bash", "scripts/gpu_attention_check.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    written = {p.name for p in out.iterdir()}
    assert written <= FILES and len(written) <= 8
    assert "tests exit: 0" in (out / "tests.log").read_text()
    assert "benchmark exit: 0" in (out / "bench.log").read_text()
    assert load_entries(out / "attention_table.json") == load_entries(REPO / "pretrain/attention_table.json")
    log = (out / "compile.log").read_text()
    assert "train_throughput triton exit: 0" in log and "train_throughput auto exit: 0" in log
    assert "attention auto [cpu, torch.float32, head dim 16, causal]: sdpa (not a GPU)" in log  # the run says
    for attn in ("triton", "auto"):
        row = json.loads((out / f"compile_{attn}.json").read_text())["shapes"]["igpt-tiny"]
        compiled = row[f"ours_{attn}_compile"]
        assert compiled["compile_s"] > 0 and compiled["step_ms"] > 0
        assert compiled["graph_breaks"] == 0 and compiled["dynamo_warnings"] == {}
    assert "ours_triton" in json.loads((out / "compile_triton.json").read_text())["shapes"]["igpt-tiny"]
