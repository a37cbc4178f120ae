"""A build lock left by a killed JIT build (DeepSpeed's shared-memory op on CPU) no longer hangs training."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from igpt.pretrain.deepspeed_ops import clear_stale_lock, held_open
from test_train_support import all_logs, launch, run_overrides, wait_all

HOLD_OPEN = "import sys, time; f = open(sys.argv[1]); print('open', flush=True); time.sleep(60)"


def _holder(path: Path) -> subprocess.Popen:
    """A process that has ``path`` open until it is killed (as torch's builder holds its lock file)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_OPEN, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open"
    return proc


def _orphan(lock: Path, age_s: float) -> None:
    """``lock`` as a killed build leaves it: a file nobody holds open, last touched ``age_s`` ago."""
    lock.touch()
    os.utime(lock, (time.time() - age_s,) * 2)


def test_a_lock_held_by_a_live_builder_is_kept_and_an_orphaned_one_removed(tmp_path, capfd):
    lock = tmp_path / "lock"
    _orphan(lock, 3600)
    holder = _holder(lock)
    try:
        assert held_open(lock)
        assert not clear_stale_lock(tmp_path) and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    assert not held_open(lock)
    assert clear_stale_lock(tmp_path) and not lock.exists()
    assert f"removed {lock}, a build lock left by a build that was killed" in capfd.readouterr().err
    assert not clear_stale_lock(tmp_path)  # nothing to remove


def test_a_young_lock_nobody_here_holds_is_waited_for(tmp_path, capfd):
    """It may be another host's build on a shared file system: waited for until it goes, or until it is old."""
    lock = tmp_path / "lock"
    _orphan(lock, 0)
    start = time.monotonic()
    assert clear_stale_lock(tmp_path, stale_after_s=1.5) and not lock.exists()
    assert 1.0 < time.monotonic() - start < 10
    err = capfd.readouterr().err
    assert "igpt: waiting up to 1 s for" in err and f"removed {lock}" in err
    _orphan(lock, 0)
    remover = threading.Timer(0.5, lock.unlink)  # the other host's build ends
    remover.start()
    assert not clear_stale_lock(tmp_path, stale_after_s=30)
    remover.join()
    assert "removed" not in capfd.readouterr().err


@pytest.mark.slow
def test_training_starts_past_a_build_lock_left_by_a_killed_build(cifar_tokens, tmp_path):
    """``igpt train`` on an extensions folder whose shm op build folder holds an orphaned ``lock`` (as a kill -9
    during the build leaves it): training finishes and says it removed the lock. Before the fix it waited on
    that file forever, silently (as every test that trains did in one CI run)."""
    from torch.utils.cpp_extension import _get_build_directory

    extensions = tmp_path / "torch-extensions"
    built = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    build_dir = extensions / "deepspeed_shm_comm"
    if built.is_dir():  # the op as built before (else it is built here, about 30 s)
        shutil.copytree(built, build_dir, ignore=shutil.ignore_patterns("lock"))
    build_dir.mkdir(parents=True, exist_ok=True)
    _orphan(build_dir / "lock", 3600)
    run = tmp_path / "run"
    args = run_overrides(cifar_tokens, run, deepspeed__zero_stage=0, train__steps=2)
    procs = launch(args, nprocs=1, log=run, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert wait_all(procs, timeout=240) == [0], all_logs(run)
    assert "a build lock left by a build that was killed" in all_logs(run), all_logs(run)
    assert not (build_dir / "lock").exists() and any(build_dir.glob("*.so"))
    assert os.path.exists(extensions / ".deepspeed_shm_comm.igpt-flock")
