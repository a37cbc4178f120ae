"""A patch model end to end: ``igpt train`` (random order), ``igpt export``, then every ``igpt eval`` command on
the release, the supervised baseline (``finetune --init random``) and the one-line refusals (Hugging Face export,
sampling a pixels-target model). One small trained run serves every test of the module."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from igpt.data_pipeline.io import file_sha256
from igpt.data_pipeline.loader import iterate_split
from igpt.pretrain.config import load_config
from igpt.pretrain.init_from import InitMismatch, load_init_state
from igpt.pretrain.models import build_model
from igpt.pretrain.patch_model import PatchGPT
from igpt.pretrain.release import load_model, write_release
from test_train_support import REPO, all_logs, read_log, run_overrides, train_ranks

pytestmark = pytest.mark.slow
STEPS = 40


def igpt(argv: list[str]) -> int:
    from igpt.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def patch_release(tmp_path_factory, cifar_tokens) -> Path:
    """A 4x4-patch model trained STEPS steps in random order on one rank, exported as a release."""
    root = tmp_path_factory.mktemp("patch_run")
    run, out = root / "run", root / "release"
    args = run_overrides(cifar_tokens, run, deepspeed__zero_stage=0, train__steps=STEPS, train__val_every=STEPS,
                         train__micro_batch_size=16, model__unit="patch", model__patch_size=4,
                         model__order="random", train__log_every=STEPS)
    assert train_ranks(args, run, nprocs=1) == [0], all_logs(run)
    subprocess.run([sys.executable, "-m", "igpt.pretrain.cli", "export", str(run), "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True)
    return out


def test_trained_patch_release_loads_with_its_palette_and_logs_pixels(patch_release, cifar_tokens):
    model, cfg, sha = load_model(patch_release)
    assert isinstance(model, PatchGPT) and cfg.model.n_ctx == 16 and model.wpe_input is not None
    palette = torch.as_tensor(np.load(cifar_tokens / "palette.npy"))
    assert torch.equal(model.palette[: len(palette)], palette)
    state = load_init_state(patch_release, cfg.model, sha)  # train.init_from of a patch release
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(InitMismatch, match=r"model.order: 'random' in the source, 'raster' in this run.*parameters"):
        load_init_state(patch_release, replace(cfg.model, order="raster"), sha)  # and no wpe_input
    log = read_log(patch_release.parent / "run")
    assert "k px/s" in log and "256 tokens/step" in log  # 16 sequences x 16 patches; pixels beside them


def test_eval_nll_is_bits_per_pixel_and_matches_the_model(patch_release, cifar_tokens, tmp_path, capsys):
    assert igpt(["eval", "nll", "--checkpoint", str(patch_release), "--data", str(cifar_tokens),
                 "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["nats_per_token"] < math.log(512) - 1.0  # trained from the uniform ln 512
    assert summary["bits_per_pixel"] == pytest.approx(summary["nats_per_token"] / math.log(2))
    model, _, _ = load_model(patch_release)
    batches = [b["tokens"] for b in iterate_split(cifar_tokens, "val", 64)]
    with torch.no_grad():
        per_image = torch.cat([model.position_losses(t).mean(1) for t in batches])
    assert summary["images"] == len(per_image)
    assert summary["nats_per_token"] == pytest.approx(per_image.double().mean().item(), rel=1e-5)


def test_eval_sample_writes_patch_by_patch_grids(patch_release, cifar_tokens, tmp_path, capsys):
    assert igpt(["eval", "sample", "--checkpoint", str(patch_release), "--data", str(cifar_tokens),
                 "--out", str(tmp_path), "--num-samples", "4", "--num-images", "2", "--per-image", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["files"]) == {"samples", "completions"} and (tmp_path / "completions.png").is_file()


def test_eval_probe_with_baselines(ray_session, patch_release, cifar_tokens, tmp_path, capsys):
    assert igpt(["eval", "probe", "--checkpoint", str(patch_release), "--data", str(cifar_tokens),
                 "--out", str(tmp_path), "--layers", "1", "--baselines", "--set", "probe.l2=[0.1]",
                 "--set", "probe.max_iter=100", "--set", "probe.widen=0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trials"] == 1 and summary["accuracy"] > 0.15  # 10 classes
    assert set(summary["baselines"]) == {"raw_pixels", "random_init"}
    assert summary["baselines"]["random_init"]["accuracy"] > 0.12  # the random network sees the palette colours


@pytest.mark.parametrize("init", ["pretrained", "random"])
def test_eval_finetune_and_the_supervised_baseline(ray_session, patch_release, cifar_tokens, tmp_path, capsys, init):
    assert igpt(["eval", "finetune", "--checkpoint", str(patch_release), "--data", str(cifar_tokens),
                 "--out", str(tmp_path), "--limit", "300", "--init", init, "--set", "finetune.lr=[0.003]",
                 "--set", "finetune.lam=[0.5]", "--set", "finetune.epochs=[2]", "--set", "finetune.batch_size=16"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["init"] == init and len(summary["trials"]) == 1
    assert summary["best"]["lam"] == (0.5 if init == "pretrained" else 0.0)  # the baseline learns from labels only
    assert summary["accuracy"] > 0.12


def test_refusals_are_one_line(patch_release, cifar_tokens, tmp_path, capsys):
    assert igpt(["export", str(patch_release), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "only pixel models export to Hugging Face ImageGPT" in err

    cfg = load_config(None, [f"data.dir={cifar_tokens}", "model.unit=patch", "model.target=pixels",
                             "model.n_ctx=16", "model.vocab_size=512"])
    model = build_model(cfg.model, np.load(cifar_tokens / "palette.npy"))
    pixels = write_release(tmp_path / "pixels", model.state_dict(), cfg, cifar_tokens / "palette.npy",
                           {"palette_sha256": file_sha256(cifar_tokens / "palette.npy")})
    assert igpt(["eval", "sample", "--checkpoint", str(pixels), "--data", str(cifar_tokens),
                 "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sample needs a model that predicts tokens" in err
    assert igpt(["eval", "nll", "--checkpoint", str(pixels), "--data", str(cifar_tokens),
                 "--out", str(tmp_path / "n")]) == 0
    summary = json.loads(capsys.readouterr().out)
    # the zero head predicts 0: the MSE is the mean square of the normalised colours, below 1 (flat patches are 0)
    assert "bits_per_pixel" not in summary and 0.3 < summary["mse"] < 1.0
