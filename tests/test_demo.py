"""The main job end to end, shortened (`igpt demo --quick`): every stage runs for real and a rerun reuses them."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def _demo(workdir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", "import sys; from igpt_cli import main; sys.exit(main())",
                           "demo", "--quick", "--workdir", str(workdir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path: Path, cifar_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    work = tmp_path / "demo"
    first = _demo(work)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "open MLflow: mlflow ui --backend-store-uri sqlite:///" in first.stdout

    summary = json.loads((work / "summary.json").read_text())
    bar = summary["quality_bar"]
    assert bar["val_bits_per_pixel"] < math.log2(512) - 0.1  # untrained is exactly 9; a dozen steps already learn
    for key in ("probe_accuracy", "raw_pixels_accuracy", "random_init_accuracy"):
        assert 0.0 <= bar[key] <= 1.0
    assert bar["raw_pixels_accuracy"] > 0.15  # well above chance: the probe itself works

    manifest = json.loads((work / "tokens16" / "manifest.json").read_text())
    assert manifest["num_inputs"] == 2000
    assert json.loads((work / "tokens32" / "manifest.json").read_text())["resolution"] == 32
    completions = Image.open(summary["artifacts"]["completions"])
    assert completions.width > 16 * 4 and completions.height > 16 * 4

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = {r.info.run_name: r for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id])}
    assert {"nll", "sample", "probe"} <= set(runs)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    train_runs = [r for r in runs.values() if "loss" in r.data.metrics]
    assert train_runs, "the pretraining run is missing from the MLflow store"
    assert "completions.png" in {a.path for a in client.list_artifacts(runs["sample"].info.run_id)}

    second = _demo(work)
    assert second.returncode == 0, second.stderr[-4000:]
    assert second.stderr.count("reusing") >= 4
    assert json.loads((work / "summary.json").read_text())["quality_bar"] == bar
