"""Preemption by a signal sent to the whole process group (ranks and their DataLoader workers), as SLURM,
``timeout`` and ``kill -- -PGID`` send it: a checkpoint, the requeue exit code, and an exact resume."""
from __future__ import annotations

import os
import random
import signal
import time

import pytest

from igpt.pretrain import checkpoint as ckpt
from test_train_support import all_logs, launch, read_log, run_overrides, step_losses, train_ranks, wait_all

pytestmark = pytest.mark.slow
STEPS = 40


def _signal_step(request) -> int:
    """A step in [10, 30], drawn from a seed printed for reproduction (IGPT_TEST_SEED fixes it)."""
    seed = int(os.environ.get("IGPT_TEST_SEED", random.randrange(2**31)))
    step = random.Random(seed).randint(10, 30)
    print(f"{request.node.name}: IGPT_TEST_SEED={seed} → signal at step {step}")
    return step


@pytest.mark.parametrize("ranks, stage", [(2, 2), (1, 0)])
def test_sigterm_to_the_process_group_checkpoints_and_resumes_exactly(cifar_tokens, tmp_path, request, ranks, stage):
    common = dict(deepspeed__zero_stage=stage, train__steps=STEPS, data__num_workers=2, train__precision="fp32")
    ref = tmp_path / "ref"
    assert train_ranks(run_overrides(cifar_tokens, ref, **common), ref, nprocs=ranks) == [0] * ranks, all_logs(ref)
    expected = step_losses(ref)

    target = _signal_step(request)
    cut = tmp_path / "cut"
    args = run_overrides(cifar_tokens, cut, **common)
    procs = launch(args, nprocs=ranks, log=cut)
    deadline = time.time() + 300
    while not (cut / "losses.jsonl").is_file() or max(step_losses(cut), default=0) < target:
        assert time.time() < deadline and all(p.poll() is None for p in procs), all_logs(cut)
        time.sleep(0.02)
    os.killpg(procs[0].pid, signal.SIGTERM)  # every rank and every DataLoader worker of the group
    assert wait_all(procs) == [124] * ranks, all_logs(cut)
    stopped = max(step_losses(cut))
    assert target <= stopped < STEPS
    assert [p.name for p in ckpt.find_resumable(cut)] == [ckpt.tag_for(stopped)]  # complete and verified
    log = read_log(cut)
    assert "preemption (SIGTERM)" in log and "DataLoader worker" not in log, log

    assert train_ranks(args, cut, nprocs=ranks, resume="auto") == [0] * ranks, all_logs(cut)
    assert f"at step {stopped}" in read_log(cut)
    assert step_losses(cut) == expected  # bit-identical per-step losses across the preemption
