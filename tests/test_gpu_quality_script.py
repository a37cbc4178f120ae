"""scripts/gpu_quality_check.sh, the GPU session of the model-quality issue, run on the CPU at a tiny size:
margin shards, the throughput probe that sizes train.steps, the recipe with augmentation, export and the
Ray-free scorer, and what comes back under $OUT."""
from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from isolated_venv import ONLY_PYTHONPATH, REPO, make_venv

from igpt.data_pipeline.manifest import Manifest


@pytest.mark.slow
@pytest.mark.parametrize("script, n_ctx", [("gpu_quality_check.sh", 256), ("gpu_vit_check.sh", 16)])
def test_gpu_quality_script_end_to_end_on_cpu(cifar_dir, cifar_tokens, tmp_path, script, n_ctx):
    """Pixel iGPT's recipe, and the patch model's (configs/cifar10-gpu-vit.yaml: 4x4 patches, random order)."""
    # As on a GPU machine: igpt is not installed; only the script's PYTHONPATH, the checkout, leads to it.
    venv = make_venv(tmp_path / "venv")
    out = tmp_path / "out"
    env = {**venv.env(**ONLY_PYTHONPATH), "OUT": str(out), "WORK": str(tmp_path / "work"),
           "SRC": str(cifar_dir / "cifar10-train-000000.tar"),
           "PALETTE": str(cifar_tokens / "palette.npy"), "LIMIT": "600", "RES": "16", "MARGIN": "2", "DEVICE": "cpu",
           "SKIP_INSTALL": "1", "PY": str(venv.python), "PROBE_STEPS": "6", "TRAIN_SECONDS": "2", "PROBE_LAYERS": "1",
           "PROBE_CONCAT": "0,1,2", "DS_ACCELERATOR": "cpu",
           "EXTRA": "model.n_layer=2 model.n_embd=32 model.n_head=2 train.precision=fp32 train.micro_batch_size=8 "
                    "data.num_workers=0 train.log_every=2 train.val_every=4 checkpoint.every=4 train.val_batches=2"}
    done = subprocess.run(["bash", f"scripts/{script}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl", "score.json", "score.log",
                                                    "setup.log", "summary.md", "train.log"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["hflip"] and cfg["data"]["random_crop"] and cfg["data"]["dir"].endswith("tokens16m2")
    assert cfg["model"]["n_ctx"] == n_ctx  # the training size, not the stored 18x18 (16 patches of 4x4)
    steps = int(re.search(r"training (\d+) steps", done.stdout).group(1))
    assert cfg["train"]["steps"] == steps >= 1  # sized by the throughput probe
    score = json.loads((out / "score.json").read_text())
    assert score["val_images"] == Manifest.load(tmp_path / "work" / "tokens16").split("val").num_samples
    for key in ("probe_best_accuracy", "probe_concat_accuracy", "raw_pixels_accuracy"):
        assert 0.0 <= score[key] <= 1.0
    assert score["probe_concat_layers"] == "0+1+2"
    table = (out / "summary.md").read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("| settings |") and f"{steps} steps" in table[2]
