"""Hostile run dirs and releases: a crafted checkpoint pickle never runs (evaluated, exported, used as
``train.init_from`` or resumed), and a foreign ``config.yaml`` is never interpolated."""
from __future__ import annotations

import os
import pathlib
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from igpt.cli import main
from igpt.data_pipeline.io import file_sha256
from igpt.errors import UserError
from igpt.pretrain import checkpoint as ckpt
from igpt.pretrain.config import ConfigError, config_from_checkpoint, load_config, save_config
from igpt.pretrain.init_from import load_init_state
from igpt.pretrain.model import IGPT
from igpt.pretrain.release import write_release
from test_train_support import REPO, TINY, run_overrides


class Payload:
    """Unpickling it creates ``marker``: the stand-in for any code a crafted pickle runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def tiny_config(data: Path, run_dir: Path):
    return load_config(TINY, [f"data.dir={data}", f"train.run_dir={run_dir}", "model.n_ctx=256",
                              "model.vocab_size=512", "deepspeed.zero_stage=0"])


def crafted_run(root: Path, data: Path, zero_stage: int = 0) -> tuple[Path, Path, Path]:
    """(run dir, its crafted model-states file, the marker its payload would create): a config.yaml and one
    checkpoint tag with a valid COMPLETE.json, as `igpt train` leaves them."""
    run, marker = root / "run", root / "PWNED"
    save_config(tiny_config(data, run), run / "config.yaml")
    tag = ckpt.checkpoints_dir(run) / ckpt.tag_for(1)
    tag.mkdir(parents=True)
    crafted = tag / ckpt.MODEL_STATES
    torch.save({"module": Payload(marker), "rng_states": []}, crafted)
    ckpt.write_marker(tag, {"step": 1, "world_size": 1, "palette_sha256": file_sha256(data / "palette.npy"),
                            "zero_stage": zero_stage})
    return run, crafted, marker


def assert_refused(message: str, crafted: Path, marker: Path) -> None:
    assert not marker.exists(), "the crafted pickle ran"
    assert len(message.strip().splitlines()) == 1, message
    assert str(crafted) in message and "--trust-checkpoint" in message and "igpt export" in message, message


def test_eval_nll_refuses_a_crafted_zero0_checkpoint(cifar_tokens, tmp_path, capsys):
    run, crafted, marker = crafted_run(tmp_path, cifar_tokens)
    args = ["eval", "nll", "--checkpoint", str(run), "--data", str(cifar_tokens), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert_refused(capsys.readouterr().err, crafted, marker)
    with pytest.raises(AttributeError):  # the payload's None where the module belongs
        main([*args, "--trust-checkpoint"])
    assert marker.exists()  # the flag, the way out, reaches the loader: the file is unpickled in full


def test_export_refuses_deepspeed_shards_writable_by_others(cifar_tokens, tmp_path, capsys):
    run, crafted, marker = crafted_run(tmp_path, cifar_tokens, zero_stage=1)
    crafted.chmod(crafted.stat().st_mode | stat.S_IWOTH)
    code = main(["export", str(run), "--out", str(tmp_path / "release")])
    assert code == 2 and not (tmp_path / "release").exists()
    err = capsys.readouterr().err
    assert_refused(err, crafted, marker)
    assert "writable by group or others" in err


def test_init_from_refuses_a_crafted_checkpoint(cifar_tokens, tmp_path):
    run, crafted, marker = crafted_run(tmp_path, cifar_tokens)
    with pytest.raises(UserError) as err:
        load_init_state(run, tiny_config(cifar_tokens, tmp_path / "new").model, file_sha256(cifar_tokens / "palette.npy"))
    assert_refused(str(err.value), crafted, marker)


def test_resume_refuses_a_checkpoint_others_can_write(cifar_tokens, tmp_path):
    run, crafted, marker = crafted_run(tmp_path, cifar_tokens)
    crafted.chmod(crafted.stat().st_mode | stat.S_IWOTH)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop(ckpt.TRUST_ENV, None)
    cmd = [sys.executable, "-m", "igpt.cli", "train", str(TINY), *run_overrides(cifar_tokens, run), "model.n_ctx=256",
           "model.vocab_size=512", "deepspeed.zero_stage=0", "logging.backend=jsonl", "--resume", "auto"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert_refused(out.stderr.strip().splitlines()[-1], crafted, marker)


def test_trust_comes_from_ownership_the_flag_or_the_environment(cifar_tokens, tmp_path, monkeypatch):
    run, crafted, _ = crafted_run(tmp_path, cifar_tokens)
    tag = crafted.parent
    ckpt.check_trusted(tag)  # all the user's own, writable by nobody else
    (run / "checkpoints").chmod(0o775)
    if ckpt._private_group(os.getgid()):  # umask 002 in a user-private group: still nobody else's
        ckpt.check_trusted(tag)
    assert not ckpt._private_group(65534)  # nogroup: not the user's own
    with monkeypatch.context() as m:
        m.setattr(ckpt, "_private_group", lambda gid: False)  # a group shared with others
        with pytest.raises(UserError, match="checkpoints is writable by group or others"):
            ckpt.check_trusted(tag)
    (run / "checkpoints").chmod(0o757)
    with pytest.raises(UserError, match="checkpoints is writable by group or others"):
        ckpt.check_trusted(tag)
    (run / "checkpoints").chmod(0o755)
    ckpt.check_trusted(tag, trust=True)
    monkeypatch.setenv(ckpt.TRUST_ENV, "1")
    ckpt.check_trusted(tag)


def test_interpolation_in_a_release_config_is_refused_and_does_not_leak(cifar_tokens, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", "/home/s3cret")
    cfg = tiny_config(cifar_tokens, tmp_path / "run")
    release = write_release(tmp_path / "release", IGPT(cfg.model).state_dict(), cfg, cifar_tokens / "palette.npy",
                            {"palette_sha256": file_sha256(cifar_tokens / "palette.npy")})
    config = release / "config.yaml"
    config.write_text(config.read_text().replace("run_name: null", "run_name: ${oc.env:HOME}"))
    before = config.read_text()
    code = main(["eval", "nll", "--checkpoint", str(release), "--data", str(cifar_tokens), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(config) in err and "'logging.run_name'" in err and "interpolation" in err and "s3cret" not in err
    assert config.read_text() == before and not (tmp_path / "o").exists()


def test_interpolation_in_a_checkpoint_config_is_refused_but_a_users_own_config_may_interpolate(tmp_path,
                                                                                               monkeypatch):
    with pytest.raises(ConfigError, match=r"checkpoint X: config key 'optim.betas.1' holds an interpolation"):
        config_from_checkpoint({"optim": {"betas": [0.9, "${oc.env:BETA}"]}}, "checkpoint X")
    monkeypatch.setenv("IGPT_TEST_DATA", "/data/tokens")
    own = tmp_path / "own.yaml"
    own.write_text("data:\n  dir: ${oc.env:IGPT_TEST_DATA}\n")
    assert load_config(own).data.dir == "/data/tokens"
    with pytest.raises(ConfigError, match=r"own.yaml: config key 'data.dir' holds an interpolation"):
        load_config(own, plain=True)
