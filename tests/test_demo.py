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
    assert first.stdout.count("[not judged: quick run]") == 4  # 12 steps cannot meet the bar: not judged
    assert "[PASS]" not in first.stdout and "[FAIL]" not in first.stdout

    summary = json.loads((work / "summary.json").read_text())
    bar = summary["quality_bar"]
    assert bar["val_loss_unit"] == "bits/pixel" and bar["val_loss"] < math.log2(512) - 0.1  # untrained is exactly 9; a dozen steps already learn
    for key in ("probe_accuracy", "raw_pixels_accuracy", "random_init_accuracy"):
        assert 0.0 <= bar[key] <= 1.0
    assert bar["raw_pixels_accuracy"] > 0.15  # well above chance: the probe itself works
    assert summary["training"]["unit"] == "pixel" and 0 < summary["training"]["loop_seconds"] <= \
        summary["training"]["wall_seconds"]

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


def _summary(work, **bar) -> dict:
    """A demo summary.json's parts that format_report reads."""
    quality_bar = {"probe_accuracy": 0.2, "probe_features": 2, "probe_l2": 0.01, "probe_l2_searched": [0.01, 1.0],
                   "raw_pixels_accuracy": 0.25, "random_init_accuracy": 0.18, "val_loss": 7.5,
                   "val_loss_unit": "bits/pixel", "untrained_loss": math.log2(512), "beats_raw_pixels": False,
                   "probe_l2_interior": False, "beats_random_init": True, "loss_well_below_untrained": False, **bar}
    artifacts = {k: str(work / k) for k in ("palette", "token_shards", "run_dir", "release", "samples")}
    return {"quality_bar": quality_bar, "artifacts": artifacts, "mlflow_ui": "mlflow ui", "mlflow_url": "http://x"}


def test_report_judges_the_quality_bar_except_in_a_quick_run(tmp_path):
    from igpt.demo import format_report

    full = format_report(_summary(tmp_path))
    assert full.count("[FAIL]") == 3 and full.count("[PASS]") == 1 and "not judged" not in full
    quick = format_report(_summary(tmp_path), judged=False)
    assert quick.count("[not judged: quick run]") == 4 and "PASS" not in quick and "FAIL" not in quick
    assert [line.split("[")[0] for line in quick.splitlines()] == [line.split("[")[0] for line in full.splitlines()]
    assert "linear probe accuracy: 0.200 (layer 2, L2 0.01, at an edge of the 2 L2 values 0.01..1 searched)" in quick


def test_report_shows_an_mse_and_the_other_demo_beside_this_one(tmp_path):
    from igpt.demo import format_report

    summary = _summary(tmp_path, probe_accuracy=0.25, val_loss=0.45, val_loss_unit="MSE", untrained_loss=47 / 48,
                       loss_well_below_untrained=True)
    summary["training"] = {"unit": "patch", "wall_seconds": 400.0, "loop_seconds": 390.0}
    summary["beside"] = {"workdir": "/w/demo", "quality_bar": _summary(tmp_path)["quality_bar"],
                         "training": {"unit": "pixel", "wall_seconds": 410.0, "loop_seconds": 395.0}}
    report = format_report(summary)
    assert "validation MSE: 0.450 (untrained: 0.979)  [PASS]" in report
    assert "beside the pixel demo in /w/demo:" in report and "(this one +5.0 points)" in report
    assert "its validation bits/pixel: 7.500" in report and "training loop:       395 s (this one 390 s)" in report
    assert "beside" not in format_report(_summary(tmp_path))


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
