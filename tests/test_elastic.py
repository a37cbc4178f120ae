"""Elastic resume: a ZeRO-2 checkpoint resumed on another number of ranks (2 → 1, 1 → 2) through DeepSpeed's
universal checkpoint, keeping the global batch through grad_accum, and the data stream re-split exactly."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from igpt.data_pipeline.manifest import Manifest
from igpt.pretrain import checkpoint as ckpt
from test_train_support import REPO, all_logs, launch, read_log, run_overrides, step_losses, train_ranks, wait_all

pytestmark = pytest.mark.slow
S, T, MICRO = 10, 64, 32  # checkpoint step, total steps (past the end of the first epoch), micro-batch

# Run in every rank of the resumed layout: build the Trainer with --resume, report what it loaded.
PROBE = r"""
import sys, torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from igpt.data_pipeline.loader import iterate_split
from igpt.pretrain.config import load_config
from igpt.pretrain.distributed import shutdown
from igpt.pretrain.train import Trainer

out, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
resume = overrides.pop(overrides.index("--resume") + 1)
overrides.remove("--resume")
cfg = load_config(config, overrides)
trainer = Trainer(cfg, resume=resume)
state = {name: {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
         for name, p in trainer.model.named_parameters()}
tokens = next(iter(iterate_split(cfg.data.dir, "val", 8)))["tokens"]
loss = float(trainer.engine(tokens, evaluate=True))
steps = sorted({int(st["step"]) for st in trainer.adam.state.values()})
if trainer.rank == 0:
    torch.save({"step": trainer.state.step, "loss": loss, "state": state, "adam_steps": steps}, out)
trainer.tracker.close("FINISHED")
trainer.engine.destroy()
shutdown()
"""


def _layout(ranks: int) -> dict:
    """The same global batch of 2 x MICRO sequences on 1 or 2 ranks."""
    return dict(train__micro_batch_size=MICRO, train__grad_accum=2 // ranks)


def _keys(run: Path) -> list[tuple[int, str]]:
    """(epoch, key) of every sample the run's ranks trained on (``data.record_keys``)."""
    records = [json.loads(line) for path in run.glob("data_keys.rank*.jsonl") for line in path.read_text().splitlines()]
    return [(r["epoch"], key) for r in records for key in r["keys"]]


def _cut_at(ref: Path, dest: Path) -> Path:
    """A run dir holding only ``ref``'s checkpoint at step S and its records up to S."""
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / ckpt.tag_for(S), dest / "checkpoints" / ckpt.tag_for(S))
    shutil.copy(ref / "config.yaml", dest / "config.yaml")
    for name in ["losses.jsonl", *(p.name for p in ref.glob("data_keys.rank*.jsonl"))]:
        lines = [line for line in (ref / name).read_text().splitlines() if json.loads(line)["step"] <= S]
        (dest / name).write_text("".join(line + "\n" for line in lines))
    return dest / "checkpoints" / ckpt.tag_for(S)


def _kill_during_conversion(tag: Path) -> None:
    """SIGKILL a universal conversion of ``tag`` while it runs; the original must stay complete and usable."""
    code = "import sys; from pathlib import Path; from igpt.pretrain.checkpoint import convert_to_universal; " \
           "convert_to_universal(Path(sys.argv[1]))"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tag)], cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    deadline = time.time() + 120
    while not list(tag.glob(".universal.*")):
        assert proc.poll() is None and time.time() < deadline, "the conversion ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tag / ckpt.UNIVERSAL).exists()  # nothing that looks converted
    assert ckpt.verify(tag)["step"] == S  # the original is untouched and complete


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_zero2_resumes_on_another_world_size(cifar_tokens, tmp_path, before, after):
    common = dict(deepspeed__zero_stage=2, train__steps=T, train__precision="fp32", logging__backend="jsonl",
                  data__record_keys="true", data__shuffle_buffer=64)
    ref = tmp_path / "ref"  # the uninterrupted run, checkpointing at step S on its way
    ref_args = run_overrides(cifar_tokens, ref, checkpoint__every=S, checkpoint__keep_last=10, **common,
                             **_layout(before))
    assert train_ranks(ref_args, ref, nprocs=before) == [0] * before, all_logs(ref)

    run = tmp_path / "elastic"
    tag = _cut_at(ref, run)
    if before == 2:
        _kill_during_conversion(tag)
    args = run_overrides(cifar_tokens, run, checkpoint__every=1000, **common, **_layout(after))

    probe = tmp_path / "probe.pt"
    procs = launch([*args, "--resume", str(tag)], nprocs=after, log=tmp_path / "probe",
                   program=[sys.executable, "-c", PROBE, str(probe)])
    assert wait_all(procs) == [0] * after, all_logs(tmp_path / "probe")
    assert f"world size {before} → {after}, ZeRO-2 → ZeRO-2, through its universal checkpoint" in read_log(tmp_path / "probe")
    got = torch.load(probe, weights_only=False)
    assert got["step"] == S and got["adam_steps"] == [S]

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    for name, mine in got["state"].items():
        assert torch.equal(mine["fp32"], saved[f"model.{name}"].float()), name
        for moment in ("exp_avg", "exp_avg_sq"):  # the saved moments, per parameter, as DeepSpeed reads them
            expected = torch.load(tag / ckpt.UNIVERSAL / "zero" / f"model.{name}" / f"{moment}.pt", weights_only=False)
            assert torch.equal(mine[moment], expected["param"].view_as(mine[moment])), (name, moment)

    from igpt.pretrain.config import load_config
    from igpt.pretrain.model import IGPT
    from igpt.data_pipeline.loader import iterate_split

    model = IGPT(load_config(ref / "config.yaml").model)  # the uninterrupted run's weights at step S
    model.load_state_dict({k.removeprefix("model."): v.float() for k, v in saved.items()})
    tokens = next(iter(iterate_split(cifar_tokens, "val", 8)))["tokens"]
    with torch.no_grad():
        assert got["loss"] == pytest.approx(float(model.loss(tokens)), abs=1e-5)

    assert train_ranks(args, run, nprocs=after, resume="auto") == [0] * after, all_logs(run)
    log = read_log(run)
    assert f"resumed from {tag} at step {S}" in log and "epoch 0 continues without its" in log, log
    losses, reference = step_losses(run), step_losses(ref)
    assert sorted(losses) == list(range(1, T + 1))
    late = range(T - 9, T + 1)  # the curve continues: the last steps learn like the uninterrupted run's
    assert abs(sum(losses[s] for s in late) - sum(reference[s] for s in late)) / len(late) < 0.05

    seen = _keys(run)
    epoch0 = Counter(k for e, k in seen if e == 0)
    assert {e for e, _ in seen} == {0, 1}  # every rank finished epoch 0 within the run
    everything = Manifest.load(cifar_tokens).split("train").num_samples
    assert max(epoch0.values()) == 1  # no sample twice within the epoch
    assert everything - len(epoch0) <= 2 * MICRO  # at most one global batch's worth skipped (here: none)
    assert len(epoch0) == everything
