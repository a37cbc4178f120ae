"""The main job end to end, shortened (`igpt demo --quick`): CIFAR-10 downloaded from a local server, every stage
run for real, a rerun reuses them, and the console stays short."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
from PIL import Image

from igpt.data_pipeline.manifest import Manifest
from igpt.demo import _relay

FAKE_TRAINING = """
for s in range(1, 801):
    if s % 20 == 0:
        print(f"step {s:>6}/800 | loss 1.0 | ETA 1s")
    if s % 200 == 0:
        print(f"checkpoint /run/checkpoints/step_{s:08d} (0.1 s)")
print("done")
"""


def test_training_log_is_kept_whole_and_thinned_on_screen(tmp_path, capsys):
    assert _relay([sys.executable, "-c", FAKE_TRAINING], tmp_path / "train.log", dict(os.environ), False) == 0
    err = capsys.readouterr().err
    assert [line.split("|")[0].split()[1] for line in err.splitlines() if line.startswith("step")] == \
        [f"{s}/800" for s in range(100, 801, 100)]
    assert "checkpoint" not in err and err.endswith("done\n")
    assert len((tmp_path / "train.log").read_text().splitlines()) == 40 + 4 + 1
    assert _relay([sys.executable, "-c", FAKE_TRAINING], tmp_path / "v.log", dict(os.environ), True) == 0
    assert len(capsys.readouterr().err.splitlines()) == 45  # --verbose: every line


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reuses_them(quick_demo) -> None:
    from mlflow.tracking import MlflowClient

    work, first = quick_demo.work, quick_demo.first
    assert first.returncode == 0, first.stderr[-4000:]
    assert "cifar10: downloading http://127.0.0.1:" in first.stderr
    assert "md5" in first.stderr and "verified" in first.stderr
    assert "open MLflow: mlflow ui --backend-store-uri sqlite:///" in first.stdout
    assert "Traceback" not in first.stderr and "Configuration for experiment" not in first.stderr  # no Tune tables
    assert len((first.stdout + first.stderr).splitlines()) <= 40

    summary = json.loads((work / "summary.json").read_text())
    bar = summary["quality_bar"]
    assert bar["val_bits_per_pixel"] < math.log2(512) - 0.1  # untrained is exactly 9; a dozen steps already learn
    for key in ("probe_accuracy", "raw_pixels_accuracy", "random_init_accuracy"):
        assert 0.0 <= bar[key] <= 1.0
    assert bar["raw_pixels_accuracy"] > 0.15  # well above chance: the probe itself works

    assert Manifest.load(work / "tokens16").num_inputs == 2000
    assert Manifest.load(work / "tokens32").resolution == 32
    completions = Image.open(summary["artifacts"]["completions"])
    assert completions.width > 16 * 4 and completions.height > 16 * 4
    assert "step 12/12" in " ".join((work / "run" / "train.log").read_text().split())  # the whole log is kept

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("igpt-demo")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == (work / "mlartifacts").as_uri()
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"nll", "sample", "probe"} <= set(runs)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    train_runs = [r for r in runs.values() if "loss" in r.data.metrics]
    assert train_runs, "the pretraining run is missing from the MLflow store"
    assert "completions.png" in {a.path for a in client.list_artifacts(runs["sample"].info.run_id)}
    assert list((work / "mlartifacts").glob("*/artifacts/samples/*.png"))  # training sample grids beside the store

    second = quick_demo.run()
    assert second.returncode == 0, second.stderr[-4000:]
    assert second.stderr.count("reusing") >= 4 and "downloading" not in second.stderr
    assert json.loads((work / "summary.json").read_text())["quality_bar"] == bar


def test_shard_stage_with_a_margin_trains_on_margin_shards_and_evaluates_on_exact_ones(cifar_dir, cifar_tokens,
                                                                                        tmp_path):
    from igpt.demo import DemoSettings, shard_stage

    s = DemoSettings(source=str(cifar_dir / "cifar10-train-000000.tar"), limit=200, margin=2)
    train, evals = shard_stage(s, tmp_path, cifar_tokens / "palette.npy")
    assert (train.name, evals.name) == ("tokens16m2", "tokens16")
    m = Manifest.load(train)
    assert (m.resolution, m.stored_resolution("train"), m.stored_resolution("val")) == (16, 18, 16)
    assert Manifest.load(evals).split("val") == m.split("val")  # the same exact-size val shards
    assert Manifest.load(tmp_path / "tokens32").margin == 0
