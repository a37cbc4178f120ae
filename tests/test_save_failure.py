"""A checkpoint save that fails (a full disk) on one rank of two: every rank stops at once with one error line
and a code that does not requeue, nothing partial stays, and a later save of the same tag starts empty."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from igpt.pretrain import checkpoint as ckpt
from test_train_support import all_logs, launch, read_log, run_overrides, train_ranks, wait_all

FAILED = ckpt.tag_for(2)

# `igpt train` whose checkpoint writer (torch.save, under DeepSpeed's checkpoint engine) on rank argv[1] writes a
# few bytes of any file of tag argv[2] and raises ENOSPC, as a full disk does; it touches argv[3] first.
ENOSPC_ON_SAVE = r"""
import errno, os, sys
import torch
from igpt.pretrain.cli import main

rank, tag, touched, real_save = sys.argv[1], sys.argv[2], sys.argv[3], torch.save


def full_disk_save(obj, f, *args, **kwargs):
    if os.environ["RANK"] == rank and tag in str(f):
        open(touched, "w").close()
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return real_save(obj, f, *args, **kwargs)


torch.save = full_disk_save
sys.exit(main(sys.argv[4:]))
"""


def _overrides(data: Path, run: Path) -> list[str]:
    return run_overrides(data, run, train__steps=2, checkpoint__every=1, logging__backend="jsonl")


@pytest.fixture(scope="module")
def failed_run(cifar_tokens, tmp_path_factory) -> tuple[Path, list[int], float]:
    """Two ranks; step 1 saves, step 2's save fails on rank 1. Returns (run dir, exit codes, seconds from the
    failed write to the last rank's exit)."""
    tmp = tmp_path_factory.mktemp("save_failure")
    run, touched = tmp / "run", tmp / "enospc"
    program = [sys.executable, "-c", ENOSPC_ON_SAVE, "1", FAILED, str(touched), "train"]
    procs = launch(_overrides(cifar_tokens, run), log=run, program=program)
    deadline = time.monotonic() + 300
    while not touched.exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), all_logs(run)
        time.sleep(0.05)
    failed_at = time.monotonic()
    codes = wait_all(procs, timeout=60)
    return run, codes, time.monotonic() - failed_at


@pytest.mark.slow
def test_enospc_on_one_rank_stops_every_rank_and_removes_the_partial_tag(failed_run):
    run, codes, seconds = failed_run
    assert codes == [2, 2], all_logs(run)  # a user error (free the disk), not the requeue code 124
    assert seconds < 60
    assert [p.name for p in ckpt.list_tags(run)] == [ckpt.tag_for(1)]  # nothing of step 2 left
    assert [p.name for p in ckpt.find_resumable(run)] == [ckpt.tag_for(1)]
    assert (ckpt.checkpoints_dir(run) / ckpt.LATEST).read_text() == ckpt.tag_for(1)
    for rank in (0, 1):
        log = read_log(run, rank)
        assert (f"igpt train: error: checkpoint {FAILED} could not be saved (rank 1: OSError: [Errno 28] "
                "No space left on device") in log and "Traceback" not in log, log


@pytest.mark.slow
def test_a_resaved_tag_starts_empty(failed_run, cifar_tokens, tmp_path):
    """After the failure the run resumes; step 2's save goes into a dir that held a stale universal/ copy and a
    stale rank's file (left by an earlier save of that tag): the new checkpoint holds neither."""
    run = tmp_path / "run"
    shutil.copytree(failed_run[0], run)
    stale = ckpt.checkpoints_dir(run) / FAILED
    (stale / ckpt.UNIVERSAL).mkdir(parents=True)
    ckpt.write_marker(stale / ckpt.UNIVERSAL, {"source": FAILED})
    (stale / "zero_pp_rank_7_mp_rank_00_optim_states.pt").write_bytes(b"stale")
    assert train_ranks(_overrides(cifar_tokens, run), run, resume="auto") == [0, 0], all_logs(run)
    assert "at step 1" in read_log(run)
    files = json.loads((stale / ckpt.MARKER).read_text())["files"]
    assert not (stale / ckpt.UNIVERSAL).exists() and not (stale / "zero_pp_rank_7_mp_rank_00_optim_states.pt").exists()
    assert files and all(not name.startswith(ckpt.UNIVERSAL) and "rank_7" not in name for name in files), files
    assert [p.name for p in ckpt.find_resumable(run)] == [FAILED, ckpt.tag_for(1)]
    assert (ckpt.checkpoints_dir(run) / ckpt.LATEST).read_text() == FAILED


class _Writer:
    """DeepSpeed's checkpoint engine as ``save`` sees it; ``full`` writes a few bytes and fails as torch's zip
    writer does on a full disk."""

    def __init__(self, full: bool) -> None:
        self.full = full

    def save(self, state_dict: dict, path: str) -> None:
        if self.full:
            Path(path).write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        torch.save(state_dict, path)


class _Engine:
    """One rank's DeepSpeed engine, as far as ``checkpoint.save`` uses it: two files through the writer."""

    global_rank = 0

    def __init__(self, full: bool = False) -> None:
        self.checkpoint_engine = _Writer(full)

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        assert not save_latest  # `latest` is written after the marker
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            self.checkpoint_engine.save(client_state, str(Path(save_dir) / tag / name))


def test_a_torch_zip_write_error_fails_the_save_and_removes_the_tag(tmp_path):
    """A full disk under torch's zip writer is a RuntimeError, not an OSError: caught alike."""
    save = dict(client_state={}, loader_state=None, keep_last=2)
    ckpt.save(_Engine(), tmp_path, 1, **save)
    stale = ckpt.checkpoints_dir(tmp_path) / FAILED / ckpt.UNIVERSAL
    stale.mkdir(parents=True)
    with pytest.raises(ckpt.CheckpointSaveError, match=rf"checkpoint {FAILED} could not be saved \(rank 0: "
                                                       r"RuntimeError: \[enforce fail"):
        ckpt.save(_Engine(full=True), tmp_path, 2, **save)
    assert [p.name for p in ckpt.list_tags(tmp_path)] == [ckpt.tag_for(1)]
    assert (ckpt.checkpoints_dir(tmp_path) / ckpt.LATEST).read_text() == ckpt.tag_for(1)
    stale.mkdir(parents=True)
    ckpt.save(_Engine(), tmp_path, 2, **save)
    assert sorted(json.loads((stale.parent / ckpt.MARKER).read_text())["files"]) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert not stale.exists() and (ckpt.checkpoints_dir(tmp_path) / ckpt.LATEST).read_text() == FAILED
