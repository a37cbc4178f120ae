"""The training issue's GPU benchmarks, run small on the CPU with the GPU recipe's config, as
scripts/gpu_training_check.sh calls them: they must not spend a GPU session on a plumbing error."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from isolated_venv import ONLY_PYTHONPATH, REPO, make_venv

from igpt.pretrain.distributed import single_process_env

RECIPE = str(REPO / "configs" / "cifar10-gpu-recipe.yaml")
REFERENCE = REPO.parent / "shared" / "reference" / "plain_igpt.py"
TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "train.micro_batch_size=8", "data.num_workers=1",
        "optim.warmup_steps=2"]


def _bench(script: str, *args: str, venv_dir: Path) -> subprocess.CompletedProcess:
    """``python3 benchmarks/SCRIPT ARGS`` as scripts/gpu_training_check.sh runs it: igpt not installed, the
    checkout on PYTHONPATH (for the benchmark and the igpt processes it starts)."""
    venv = make_venv(venv_dir)
    done = subprocess.run([venv.python, f"benchmarks/{script}", *args], cwd=REPO,
                          env=single_process_env(venv.env(**ONLY_PYTHONPATH, PYTHONPATH=str(REPO),
                                                          DS_ACCELERATOR="cpu")),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_precision_ablation_engine_equals_the_plain_loop_on_the_same_augmented_stream(cifar_tokens_margin, tmp_path):
    results = tmp_path / "ablation.json"
    _bench("precision_ablation.py", "--data", str(cifar_tokens_margin), "--config", RECIPE, "--device", "cpu",
           "--steps", "4", "--eval-every", "2", "--rows", "plain-fp32", "engine-fp32-sdpa", "--out",
           str(tmp_path / "runs"), "--results", str(results), *TINY, "data.hflip=true", "data.random_crop=true",
           venv_dir=tmp_path / "venv")
    rows = json.loads(results.read_text())["rows"]
    plain, engine = rows["plain-fp32"]["val_nll"], rows["engine-fp32-sdpa"]["val_nll"]
    assert list(plain) == list(engine) == ["2", "4"]
    for step in plain:  # the same stream (flips and crops drawn alike), init, optimizer and schedule
        assert engine[step] == pytest.approx(plain[step], abs=1e-5)
    assert plain["4"] < plain["2"]
    assert rows["engine-fp32-sdpa"]["training_val_loss"] == pytest.approx(engine["4"], abs=1e-4)


@pytest.mark.slow
def test_recipe_vs_plain_runs_the_recipe_unaugmented_on_exact_shards(cifar_tokens, tmp_path):
    out = tmp_path / "result.json"
    reference = ["--reference", str(REFERENCE)] if REFERENCE.is_file() else ["--skip-reference"]
    printed = _bench("recipe_vs_plain.py", "--data", str(cifar_tokens), "--tokens", "4e4", "--device", "cpu",
                     *reference, "--repeats", "2", "--out", str(tmp_path / "runs"), "--json", str(out), *TINY,
                     "train.precision=fp32", "data.hflip=false", "data.random_crop=false",
                     venv_dir=tmp_path / "venv").stdout
    result = json.loads(out.read_text())
    assert result["steps"] == 4e4 // (8 * 256) and result["shape"]["n_layer"] == 1
    ours = result["ours"]
    assert ours["val_nll"] < 6.1 and ours["tokens_per_s"] > 0
    assert ours["training_val_loss"] == pytest.approx(ours["val_nll"], abs=1e-3)
    assert 0.0 < ours["probe_best_accuracy"] <= 1.0
    wall = ours["wall_time"]  # the loop's breakdown: the phases and the rest add up to its wall time
    assert sum(v for k, v in wall.items() if k != "total") == pytest.approx(wall["total"], rel=1e-6)
    assert wall["step"] > 0 and wall["validation"] > 0 and 0 <= ours["outside_step_share"] < 1
    again = result["rounds"][1]["ours"]  # the second round measures throughput only, on the same data and steps
    assert "probe_best_accuracy" not in again and again["val_nll"] == pytest.approx(ours["val_nll"], abs=1e-6)
    if REFERENCE.is_file():
        assert result["plain"]["val_nll"] < 6.1 and "val_nll_delta" in result["ours_vs_plain"]
        low, high = result["ours_vs_plain"]["tokens_per_s_range"]
        assert low <= result["ours_vs_plain"]["tokens_per_s"] <= high
        assert result["rounds"][1]["plain"]["probe_best_accuracy"] is None
    assert "| val NLL (nats/token) |" in printed and "our loop, " in printed


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE.is_file(), reason="--paired runs the reference, ../shared/reference/plain_igpt.py")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--paired pins each side to a CPU of its own")
def test_recipe_vs_plain_paired_runs_both_sides_at_once_on_swapped_cpus(cifar_tokens, tmp_path):
    out, runs = tmp_path / "result.json", tmp_path / "runs"
    _bench("recipe_vs_plain.py", "--data", str(cifar_tokens), "--tokens", "2e4", "--device", "cpu", "--reference",
           str(REFERENCE), "--paired", "--repeats", "2", "--out", str(runs), "--json", str(out), *TINY,
           "train.precision=fp32", "data.hflip=false", "data.random_crop=false", venv_dir=tmp_path / "venv")
    result = json.loads(out.read_text())
    assert result["paired"] and result["omp_num_threads"] == 1
    for k, r in enumerate(result["rounds"]):
        first = "ours" if k % 2 == 0 else "plain"  # the side given first gets CPU 0; the order swaps every round
        for side in ("ours", "plain"):
            cpu = 0 if side == first else 1
            assert r[side]["cpu"] == cpu
            command = (runs / f"round{k + 1}" / f"{side}.log").read_text().splitlines()[0]
            assert command.startswith(f"$ taskset -c {cpu} "), command
        assert max(r["ours"]["started"], r["plain"]["started"]) < min(r["ours"]["ended"], r["plain"]["ended"])
        assert "probe_best_accuracy" not in r["ours"] and r["plain"]["probe_best_accuracy"] is None  # throughput only
    v = result["ours_vs_plain"]
    assert v["tokens_per_s_range"][0] <= v["tokens_per_s"] <= v["tokens_per_s_range"][1]
