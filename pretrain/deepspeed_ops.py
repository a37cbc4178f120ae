"""DeepSpeed's JIT-built op on CPU (the shared-memory collective), loaded so that a killed build cannot hang us.

torch builds a JIT extension under a lock *file*, ``BUILD_DIR/lock``, which it deletes when the build is done;
every other process that loads the op waits for the file to go, without a deadline and without a word. A process
killed while it held the file (kill -9, a job's time limit, a preempted node) leaves it behind, and from then on
every DeepSpeed start on CPU that uses the same extensions folder hangs before its first log line.

``load_shm_op`` loads the op before ``deepspeed.init_distributed`` does, under an ``flock`` of our own, which the
kernel releases when its holder dies. While we hold it no other igpt process is building, so a lock file that no
process on this host holds open is stale: it is removed, with one line on stderr that names it. A lock file younger
than ``STALE_AFTER_S`` is waited for first: on a shared file system whose ``flock`` does not reach other hosts, it
may be another node's build, which a compile of the op (about 30 s) has finished by then.
"""
from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

STALE_AFTER_S = 120.0  # a lock file this old that no process here holds open is left by a killed build


def held_open(path: Path) -> bool:
    """Whether a process on this host has ``path`` open (torch's builder keeps its lock file open while it builds)."""
    target = os.path.realpath(path)
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            fds = list(fd_dir.iterdir())
        except OSError:  # the process ended, or is not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    return True
            except OSError:
                continue
    return False


def _age_s(path: Path) -> float | None:
    """Seconds since ``path`` was last modified; None once it is gone."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def clear_stale_lock(build_dir: Path, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Remove ``build_dir/lock`` if no process on this host holds it open and it is ``stale_after_s`` old (a younger
    one is waited for until it goes or gets that old); whether it was removed.

    Call it only while holding the igpt build flock (``load_shm_op``): then no igpt process is building there."""
    lock = build_dir / "lock"
    told = False
    while (age := _age_s(lock)) is not None and age < stale_after_s and not held_open(lock):
        if not told:
            print(f"igpt: waiting up to {stale_after_s - age:.0f} s for {lock} (no process here holds it; another "
                  "host may be building)", file=sys.stderr, flush=True)
            told = True
        time.sleep(0.5)
    if age is None or held_open(lock):
        return False
    lock.unlink(missing_ok=True)
    print(f"igpt: removed {lock}, a build lock left by a build that was killed (DeepSpeed would wait on it "
          "forever)", file=sys.stderr, flush=True)
    return True


def load_shm_op() -> None:
    """Build or load DeepSpeed's shared-memory collective (CPU only; a no-op where the accelerator has none),
    one igpt process at a time, clearing a stale build lock first."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    build_dir = Path(_get_build_directory(builder.name, verbose=False))
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f".{builder.name}.igpt-flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel when this process ends, however it ends
        clear_stale_lock(build_dir)
        builder.load(verbose=False)
