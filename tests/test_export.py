"""``igpt export`` of a 2-rank ZeRO-3 run (launched by torchrun): a release dir that loads without DeepSpeed and reproduces the run."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from igpt.data_pipeline.loader import iterate_split
from igpt.data_pipeline.io import file_sha256
from igpt.pretrain.release import load_model
from test_train_support import REPO, all_logs, run_overrides, train_ranks


PATCH_MODEL = {"model__unit": "patch", "model__patch_size": 4, "model__order": "random", "model__target": "pixels"}


@pytest.mark.slow
@pytest.mark.parametrize("model_keys", [{}, PATCH_MODEL], ids=["pixel", "patch"])
def test_export_zero3_release_loads_without_deepspeed_and_matches(cifar_tokens, tmp_path, model_keys):
    run, out = tmp_path / "run", tmp_path / "release"
    args = run_overrides(cifar_tokens, run, deepspeed__zero_stage=3, train__steps=3, train__val_every=3,
                         train__val_batches=2, **model_keys)
    assert train_ranks(args, run, torchrun=True) == [0], all_logs(run)  # 2 ranks started by torchrun
    export = [sys.executable, "-m", "igpt.pretrain.cli", "export", str(run), "--out", str(out)]
    subprocess.run(export, cwd=REPO, check=True, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors", "palette.npy"]
    again = subprocess.run(export, cwd=REPO, capture_output=True, text=True)
    assert again.returncode != 0 and "exists and is not empty" in again.stderr

    code = ("import sys; from igpt.pretrain.release import load_model; load_model(sys.argv[1]); "
            "print('deepspeed' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, check=True, capture_output=True, text=True)
    assert loaded.stdout.strip() == "False"  # a release needs no DeepSpeed import at all

    model, cfg, sha = load_model(out)
    assert sha == file_sha256(cifar_tokens / "palette.npy") == file_sha256(out / "palette.npy")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata()["step"] == "3"
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    assert cfg.deepspeed.zero_stage == 3 and model.cfg.n_ctx == (16 if model.cfg.unit == "patch" else 256)
    assert not model.head.weight.eq(0).all()
    if model.cfg.unit == "patch":  # the palette buffer came through ZeRO-3's consolidation intact
        assert torch.equal(model.palette[:len(palette := np.load(cifar_tokens / "palette.npy"))],
                           torch.as_tensor(palette))

    # The validation loss the training run logged (2 ranks x 2 batches) from the exported weights alone.
    batches = [b["tokens"] for _, b in zip(range(4), iterate_split(cifar_tokens, "val", 4))]
    with torch.no_grad():
        total = sum(model.loss(t).double() * t.numel() for t in batches)
    ours = float(total / sum(t.numel() for t in batches))
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    logged = client.get_metric_history(run_id, "val_loss")[-1]
    assert logged.step == 3 and ours == pytest.approx(logged.value, rel=1e-5)

    from_run_dir, _, _ = load_model(run)  # the run dir itself, consolidated from its ZeRO-3 shards
    for (k, a), (_, b) in zip(model.state_dict().items(), from_run_dir.state_dict().items()):
        assert torch.equal(a, b), k
