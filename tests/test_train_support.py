"""Helpers that start real multi-process training runs (imported by the other train/export tests),
plus the quick single-function checks of the training support modules."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from igpt.pretrain import checkpoint as ckpt
from igpt.pretrain.distributed import detect, expand_nodelist, free_port, setup_env
from igpt.pretrain.schedule import lr_at

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "cifar10-cpu-tiny.yaml"


def run_overrides(data_dir: Path, run_dir: Path, **extra: object) -> list[str]:
    """Overrides for a fast tiny run on the test shards (extra keys as ``section__key=value``)."""
    base = {"data.dir": data_dir, "train.run_dir": run_dir, "data.num_workers": 0, "train.micro_batch_size": 4,
            "train.log_every": 2, "train.val_every": 1000, "train.sample_every": 1000, "train.val_batches": 2,
            "optim.lr": 3e-3, "optim.warmup_steps": 2, "checkpoint.every": 1000}
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


# `igpt train` that SIGKILLs its process group right after the checkpoint of step argv[1] is complete (a
# real kill -9 at a known point); the fault is injected here, around the production code.
KILL_AFTER_CHECKPOINT = r"""
import os, signal, sys
from igpt.pretrain import checkpoint
from igpt.pretrain.cli import main

kill_at, save = int(sys.argv[1]), checkpoint.save


def save_then_kill(engine, run_dir, step, *args, **kwargs):
    path = save(engine, run_dir, step, *args, **kwargs)
    if step == kill_at and engine.global_rank == 0:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    return path


checkpoint.save = save_then_kill
sys.exit(main(sys.argv[2:]))
"""


def killed_after_checkpoint(step: int) -> list[str]:
    """A ``launch`` program: training killed (-9, the whole group) right after its checkpoint of ``step``."""
    return [sys.executable, "-c", KILL_AFTER_CHECKPOINT, str(step), "train"]


def launch(overrides: list[str], nprocs: int = 2, resume: str | None = None, env: dict | None = None,
           log: Path | None = None, torchrun: bool = False, program: list[str] | None = None) -> list[subprocess.Popen]:
    """Start ``nprocs`` ranks of ``python -m igpt.pretrain.cli train`` (or of ``program CONFIG OVERRIDES``) in one
    new process group, setting RANK/WORLD_SIZE/MASTER_* as torchrun would (rank 0 leads the group, so
    ``os.killpg`` reaches every rank), or with ``torchrun`` itself (one process returned: the launcher)."""
    port = free_port()
    cmd = [*(program or [sys.executable, "-m", "igpt.pretrain.cli", "train"]), str(TINY), *overrides]
    if resume:
        cmd += ["--resume", resume]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
               "--master_port", str(port), *cmd[1:]]
        out = open(log.with_suffix(".rank0.log"), "a") if log else subprocess.DEVNULL
        penv = {**os.environ, **(env or {}), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        return [subprocess.Popen(cmd, cwd=REPO, env=penv, stdout=out, stderr=subprocess.STDOUT)]
    procs: list[subprocess.Popen] = []
    for rank in range(nprocs):
        penv = {**os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        out = open(log.with_suffix(f".rank{rank}.log"), "a") if log else subprocess.DEVNULL
        group = {"process_group": 0 if rank == 0 else procs[0].pid}
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=penv, stdout=out, stderr=subprocess.STDOUT, **group))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    """Exit codes of every rank; kills the group and fails if they do not end within ``timeout``."""
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(deadline - time.time(), 1)))
        except subprocess.TimeoutExpired:
            os.killpg(os.getpgid(procs[0].pid), signal.SIGKILL)
            pytest.fail(f"training ranks did not finish in {timeout} s")
    return codes


def train_ranks(overrides: list[str], run_dir: Path, nprocs: int = 2, **kw) -> list[int]:
    """Run to completion and return the exit codes; logs go to RUN_DIR/../NAME.rankN.log."""
    log = run_dir.parent / run_dir.name
    return wait_all(launch(overrides, nprocs, log=log, **kw))


def read_log(run_dir: Path, rank: int = 0) -> str:
    return (run_dir.parent / f"{run_dir.name}.rank{rank}.log").read_text()


def all_logs(run_dir: Path) -> str:
    """Every rank's log, headed by its file name: the message for a failed exit-code assertion."""
    logs = sorted(run_dir.parent.glob(f"{run_dir.name}.rank*.log"))
    return "\n".join(f"==> {p.name} <==\n{p.read_text()}" for p in logs)


def step_losses(run_dir: Path) -> dict[int, float]:
    """Per-step global loss from RUN_DIR/losses.jsonl (the last record of a step wins)."""
    out: dict[int, float] = {}
    for line in (run_dir / "losses.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


# ---------------------------------------------------------------- quick checks
def test_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, warmup_steps=4, total_steps=14, min_lr=0.1)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, **kw) == pytest.approx(0.55)
    assert lr_at(14, **kw) == pytest.approx(0.1) and lr_at(100, **kw) == pytest.approx(0.1)
    assert lr_at(0, lr=1.0, warmup_steps=0, total_steps=10) == 1.0


def test_distributed_env_from_srun_torchrun_and_plain():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
           "SLURM_STEP_NODELIST": "gpu[07-08,11],cpu1"}
    d = setup_env(env)
    assert (d.rank, d.local_rank, d.world_size, d.master_addr, d.launcher) == (5, 1, 8, "gpu07", "slurm")
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1"
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == str(20000 + 4242)
    assert expand_nodelist("gpu[07-08,11],cpu1") == ["gpu07", "gpu08", "gpu11", "cpu1"]
    torchrun = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
                "TORCHELASTIC_RUN_ID": "x", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert detect(torchrun).launcher == "torchrun" and detect(torchrun).rank == 3
    assert detect({**torchrun, "CROSS_RANK": "0"}).launcher == "deepspeed"
    plain: dict[str, str] = {}
    d = setup_env(plain)
    assert (d.rank, d.world_size, d.launcher) == (0, 1, "single") and plain["MASTER_PORT"] == str(d.master_port)


def test_incomplete_checkpoint_is_skipped_and_pruned(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / ckpt.tag_for(step)).mkdir(parents=True)
        (root / ckpt.tag_for(step) / "model.pt").write_bytes(b"x" * step)
        if step != 3:
            ckpt.write_marker(root / ckpt.tag_for(step), {"step": step})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [p.name for p in ckpt.find_resumable(tmp_path)] == [ckpt.tag_for(2), ckpt.tag_for(1)]
    assert any("step_00000003" in str(w.message) and "incomplete" in str(w.message) for w in caught)
    assert [p.name for p in ckpt.prune(tmp_path, keep_last=1)] == [ckpt.tag_for(1)]
    assert sorted(p.name for p in root.iterdir()) == [ckpt.tag_for(2), ckpt.tag_for(3)]
