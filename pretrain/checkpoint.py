"""DeepSpeed checkpoints with a completeness marker, retention, resume selection and preemption.

Layout: ``RUN_DIR/checkpoints/step_00000100/`` (DeepSpeed files from every rank) and
``RUN_DIR/checkpoints/latest`` (DeepSpeed's pointer, naming the newest complete tag). A save starts
from an empty tag dir; after every rank has written its files, rank 0 writes ``COMPLETE.json``
last: the step, world size, palette sha256 and the size and sha256 of every file. A tag without a
marker, or whose files do not match it, is incomplete or corrupt: ``find_resumable`` skips it with
a warning and never loads it. A write that fails on any rank (a full disk) fails the save on every
rank with ``CheckpointSaveError`` and rank 0 removes the partial tag (``save``).

Client state (saved by DeepSpeed beside the model states): step, tokens seen, world size,
``loader_states`` and ``rng_states`` (lists indexed by rank, gathered from every rank, so each rank
restores its own), the resolved config and the palette sha256.

Elastic resume (``plan_resume``): at the same world size and ZeRO stage a checkpoint loads as saved,
bit-exactly. ZeRO-0 checkpoints hold the whole module and optimizer state in one file, so they
load at any world size as they are. A ZeRO-1/2/3 checkpoint resumed at another world size or
stage is first converted to DeepSpeed's universal format (``ds_to_universal``, per-parameter fp32
weights and Adam moments) in ``TAG/universal``, written under a temporary name and renamed when
complete (a kill during the conversion leaves the original untouched, and the next resume
converts again), then loaded with ``checkpoint.load_universal``. The data stream re-splits
(``igpt.data_pipeline.loader.TokenStream.resume_from``). Moving between ZeRO-0 and ZeRO-1/2/3 is refused.

Preemption: SIGTERM, SIGINT or ``checkpoint.preempt_signal`` (default SIGUSR1) sets a flag; the loop
agrees on it across ranks within a step, saves a checkpoint and, once it is complete, exits with
``checkpoint.preempt_exit_code`` (default 124), which a launcher or SLURM ``--requeue`` wrapper treats
as "requeue me" (a save that fails raises ``CheckpointSaveError`` instead: exit 2, no requeue).
DataLoader workers ignore these signals (``igpt.data_pipeline.loader``), so a signal sent to the whole
process group reaches the ranks without killing their loaders.

Reading weights without an engine (``igpt export``, ``igpt.pretrain.release.load_model``): ``resolve_tag``
picks a run's checkpoint, ``consolidated_state_dict`` its fp32 ``IGPT`` state dict. ZeRO-1/2/3 checkpoints
are consolidated with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (from the fp32 master
partitions of every rank); ZeRO-0 checkpoints hold the full module already.

Untrusted checkpoints: unpickling can run any code a crafted file holds. Our own read of a ZeRO-0 file uses
torch's weights-only unpickler (tensors, plain containers and NumPy's RNG state, ``SAFE_GLOBALS``). DeepSpeed
unpickles in full (``engine.load_checkpoint``, ``zero_to_fp32``, ``ds_to_universal``), so ``check_trusted``
runs before each of them (``plan_resume``, ``consolidated_state_dict``): the tag must be the user's own (every
file and dir up to the run dir owned by this uid, writable by nobody else) or trusted explicitly
(``--trust-checkpoint``, or ``IGPT_TRUST_CHECKPOINT=1``). A release dir (safetensors) is the way to share weights.
"""
from __future__ import annotations

import grp
import json
import os
import pickle
import pwd
import random
import re
import shutil
import signal
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from igpt.data_pipeline.io import atomic_dir, file_sha256, fsync_tree, write_json_atomic, write_text_atomic
from igpt.errors import UserError

MARKER = "COMPLETE.json"
LATEST = "latest"  # the name of the newest complete tag, written after its marker
TAG_RE = re.compile(r"^step_(\d{8,})$")
UNIVERSAL = "universal"  # the universal-format copy of a tag, inside the tag dir
MODULE_PREFIX = "model."  # the training engine wraps IGPT in LossModule
MODEL_STATES = "mp_rank_00_model_states.pt"  # a ZeRO-0 checkpoint's one file: module, optimizer, client state
TRUST_ENV = "IGPT_TRUST_CHECKPOINT"  # =1: trust every checkpoint, as --trust-checkpoint does (cluster jobs)
# What a model-states file holds besides tensors and plain containers: NumPy's RNG state (the client state's
# ``rng_states``), an array pickled through NumPy's ``_reconstruct`` with a uint32 dtype.
SAFE_GLOBALS = (np.ndarray(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32)))
WAYS_OUT = (f"if you trust it, pass --trust-checkpoint (or set {TRUST_ENV}=1); to share weights safely, the run's "
            "owner runs `igpt export RUN_DIR --out DIR` and you use that release dir (safetensors only)")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


# ---------------------------------------------------------------- RNG and per-rank state
def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and, if present, CUDA) RNG states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_per_rank(obj: Any) -> list[Any]:
    """``obj`` from every rank, indexed by rank (a one-element list without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- completeness marker
def write_marker(tag_dir: Path, info: dict[str, Any]) -> None:
    """Record every file of ``tag_dir`` (size, sha256) in COMPLETE.json, written last and atomically, once
    the files and folders it records are on the disk (fsynced: the marker never outlives them in a power loss)."""
    fsync_tree(tag_dir)
    files = {}
    for path in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MARKER):
        files[str(path.relative_to(tag_dir))] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    write_json_atomic({**info, "files": files}, tag_dir / MARKER)


def verify(tag_dir: Path, check_sha256: bool = True) -> dict[str, Any]:
    """The marker of a complete checkpoint; raise ValueError saying what is missing or corrupt."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        raise UserError(f"{tag_dir} is incomplete (no {MARKER})")
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{marker} is unreadable: {err}") from err
    for rel, meta in info["files"].items():
        path = tag_dir / rel
        if not path.is_file():
            raise UserError(f"{tag_dir} is corrupt: {rel} is missing")
        if path.stat().st_size != meta["size"]:
            raise UserError(f"{tag_dir} is corrupt: {rel} has {path.stat().st_size} bytes, expected {meta['size']}")
        if check_sha256 and file_sha256(path) != meta["sha256"]:
            raise UserError(f"{tag_dir} is corrupt: sha256 of {rel} does not match the marker")
    return info


def list_tags(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint tag dirs of a run, newest step first (complete or not)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(tags, key=lambda p: int(TAG_RE.match(p.name).group(1)), reverse=True)


def find_resumable(run_dir: str | os.PathLike, check_sha256: bool = True) -> list[Path]:
    """Complete, verified checkpoints newest first; incomplete or corrupt ones are skipped with a warning."""
    good = []
    for tag_dir in list_tags(run_dir):
        try:
            verify(tag_dir, check_sha256)
        except (ValueError, KeyError, OSError) as err:
            warnings.warn(f"skipping checkpoint {tag_dir.name}: {err}", stacklevel=2)
            continue
        good.append(tag_dir)
    return good


def prune(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints and any incomplete tag older than them."""
    tags = list_tags(run_dir)
    complete = [t for t in tags if (t / MARKER).is_file()]
    if len(complete) <= keep_last:
        return []
    oldest_kept = int(TAG_RE.match(complete[keep_last - 1].name).group(1))
    doomed = [t for t in tags if int(TAG_RE.match(t.name).group(1)) < oldest_kept]
    for t in doomed:
        shutil.rmtree(t, ignore_errors=True)
    return doomed


def resolve_tag(run_dir: str | os.PathLike, tag: str | None = None) -> Path:
    """The checkpoint dir to read: ``tag`` (verified) or the newest complete one."""
    if tag is not None:
        tag_dir = checkpoints_dir(run_dir) / tag
        verify(tag_dir)
        return tag_dir
    found = find_resumable(run_dir)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoints_dir(run_dir)}")
    return found[0]


def _trusted_by_user(trust: bool) -> bool:
    return trust or os.environ.get(TRUST_ENV) == "1"


def check_trusted(tag_dir: Path, trust: bool = False) -> None:
    """Raise a UserError unless DeepSpeed may unpickle the checkpoint ``tag_dir`` (which runs any code a crafted
    file holds): the user trusts it (``trust``, ``IGPT_TRUST_CHECKPOINT=1``) or owns it, that is every file of
    the tag and every dir from the tag up to the run dir belongs to this uid and is writable by nobody else (group
    write is fine in the user's private group)."""
    if _trusted_by_user(trust):
        return
    for path in [*sorted(tag_dir.rglob("*")), tag_dir, tag_dir.parent, tag_dir.parent.parent]:
        st = path.stat()
        if st.st_uid != os.getuid():
            why = f"belongs to uid {st.st_uid}, not to you"
        elif st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and not _private_group(st.st_gid)):
            why = "is writable by group or others"
        else:
            continue
        raise UserError(f"refusing to load checkpoint {tag_dir}: {path} {why}, and loading a DeepSpeed checkpoint "
                        f"runs any code its files hold; {WAYS_OUT}")


def _private_group(gid: int) -> bool:
    """Whether ``gid`` is this user's own group (a user-private group: umask 002 makes files group-writable
    there, and nobody else is in it), so that group write permission lets no one else in."""
    try:
        group, user = grp.getgrgid(gid), pwd.getpwuid(os.getuid())
    except KeyError:
        return False
    return gid == user.pw_gid and group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}


def _refused_global(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, from its long message."""
    found = re.search(r"WeightsUnpickler error: *(.+?)(\.\s|$)", str(err), re.MULTILINE)
    return found.group(1) if found else "objects other than tensors"


def _read_model_states(path: Path, trust: bool = False) -> dict[str, Any]:
    """A ZeRO-0 model-states file, through torch's weights-only unpickler (tensors, plain containers and
    ``SAFE_GLOBALS``); unpickled in full only when the user trusts it (``trust``, ``IGPT_TRUST_CHECKPOINT=1``)."""
    if _trusted_by_user(trust):
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"refusing to load {path}: it holds more than tensors and RNG states "
                        f"({_refused_global(err)}), and unpickling it could run code; {WAYS_OUT}") from None


def consolidated_state_dict(tag_dir: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """fp32 ``IGPT`` state dict of a checkpoint of any ZeRO stage: a ZeRO-0 file through the weights-only
    unpickler, ZeRO-1/2/3 shards through DeepSpeed once ``check_trusted`` (with ``trust``) allows."""
    info = verify(tag_dir, check_sha256=False)
    if info["zero_stage"] == 0:
        sd = _read_model_states(tag_dir / MODEL_STATES, trust)["module"]
    else:
        check_trusted(tag_dir, trust)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k.removeprefix(MODULE_PREFIX): v.detach().float().contiguous().clone() for k, v in sd.items()}


# ---------------------------------------------------------------- save / load through the engine
class CheckpointSaveError(UserError):
    """A checkpoint write failed on some rank (a full disk, a quota): every rank raises it, nothing partial is kept."""


class _CaughtWrites:
    """This rank's checkpoint writes (the DeepSpeed checkpoint engine's ``save``) with their first error caught
    and kept in ``error`` and every later write skipped, so that the rank stays in step with the collectives
    DeepSpeed runs between the writes. A full disk raises OSError (ENOSPC) from a plain write and RuntimeError
    from torch's zip writer."""

    def __init__(self, engine, error: Exception | None = None) -> None:
        self.writer, self.error = engine.checkpoint_engine, error

    def __enter__(self) -> "_CaughtWrites":
        write = self.writer.save

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.error is not None:
                return None
            try:
                return write(*args, **kwargs)
            except (OSError, RuntimeError) as err:
                self.error = err
                return None

        self.writer.save = guarded
        return self

    def __exit__(self, *exc: object) -> None:
        del self.writer.save  # the class's method again


def _attempt(action: Callable[..., None], *args: Any) -> OSError | None:
    """Run ``action(*args)``; the OSError it raised, or None."""
    try:
        action(*args)
    except OSError as err:
        return err
    return None


def _agree(error: Exception | None, tag_dir: Path, rank0: bool) -> None:
    """Collective: when any rank has an ``error``, rank 0 removes ``tag_dir`` and every rank raises
    CheckpointSaveError naming the tag and each failed rank's error."""
    errors = gather_per_rank(None if error is None else f"{type(error).__name__}: {error}")
    failed = [f"rank {rank}: {' '.join(e.split())}" for rank, e in enumerate(errors) if e is not None]
    if not failed:
        return
    if rank0:
        shutil.rmtree(tag_dir, ignore_errors=True)
    raise CheckpointSaveError(f"checkpoint {tag_dir.name} could not be saved ({'; '.join(failed)}); its partial "
                              f"files were removed and the earlier checkpoints are untouched: make room in "
                              f"{tag_dir.parent} and rerun with --resume auto")


def _empty_tag_dir(tag_dir: Path) -> None:
    """Remove what an earlier save of this tag left (its files, a ``universal/`` copy), so the new one starts
    empty; create the checkpoints dir here, where an error is caught, leaving DeepSpeed's uncaught mkdir no work."""
    if tag_dir.exists():
        shutil.rmtree(tag_dir)
    tag_dir.parent.mkdir(parents=True, exist_ok=True)


def save(engine, run_dir: str | os.PathLike, step: int, client_state: dict[str, Any], *, loader_state: Any,
         keep_last: int) -> Path:
    """Collective: every rank writes its DeepSpeed shards into an empty tag dir, then rank 0 writes the marker,
    points ``latest`` at the tag and prunes. A failed write on any rank fails the save on every rank alike
    (``CheckpointSaveError``) and rank 0 removes the partial tag, so no rank waits for another."""
    tag = tag_for(step)
    root = checkpoints_dir(run_dir)
    tag_dir = root / tag
    rank0 = engine.global_rank == 0
    error = _attempt(_empty_tag_dir, tag_dir) if rank0 else None
    state = dict(client_state)  # the gathers below also keep every rank out of the tag dir until it is empty
    state["loader_states"] = gather_per_rank(loader_state)
    state["rng_states"] = gather_per_rank(rng_state())
    state["world_size"] = len(state["loader_states"])
    with _CaughtWrites(engine, error) as writes:
        engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
    _agree(writes.error, tag_dir, rank0)
    if rank0:
        info = {"step": step, "world_size": state["world_size"], "palette_sha256": client_state.get("palette_sha256"),
                "zero_stage": engine.zero_optimization_stage()}
        error = _attempt(_complete, run_dir, tag_dir, info, keep_last)
    _agree(error, tag_dir, rank0)
    return tag_dir


def _complete(run_dir: str | os.PathLike, tag_dir: Path, info: dict[str, Any], keep_last: int) -> None:
    """Rank 0, once every rank has written its files: the marker, ``latest`` naming the tag, then retention."""
    write_marker(tag_dir, info)
    write_text_atomic(tag_dir.name, tag_dir.parent / LATEST)
    prune(run_dir, keep_last)


@dataclass(frozen=True)
class ResumePlan:
    """Which checkpoint a run resumes from and how: ``load_dir`` / ``load_tag`` is what DeepSpeed loads
    (``TAG`` itself, or ``TAG/universal`` when ``universal``)."""

    tag_dir: Path
    saved_world: int
    saved_stage: int
    universal: bool

    @property
    def load_dir(self) -> Path:
        return self.tag_dir / UNIVERSAL if self.universal else self.tag_dir

    def describe(self, world: int, stage: int) -> str:
        if not (self.saved_world != world or self.saved_stage != stage):
            return "same world size and ZeRO stage"
        how = "through its universal checkpoint" if self.universal else "as saved (ZeRO-0 holds everything in one file)"
        return f"world size {self.saved_world} → {world}, ZeRO-{self.saved_stage} → ZeRO-{stage}, {how}"


def plan_resume(tag_dir: Path, world: int, stage: int, trust: bool = False) -> ResumePlan:
    """How to resume from the verified checkpoint ``tag_dir`` at ``world`` ranks and ZeRO ``stage``. DeepSpeed
    unpickles a planned checkpoint (``convert_to_universal``, ``load``), so a plan is made only for one that
    ``check_trusted`` (with ``trust``) allows."""
    check_trusted(tag_dir, trust)
    info = json.loads((tag_dir / MARKER).read_text())
    saved_world, saved_stage = int(info["world_size"]), int(info["zero_stage"])
    if (saved_stage == 0) != (stage == 0):
        raise UserError(f"{tag_dir} was saved at ZeRO-{saved_stage}; resuming at ZeRO-{stage} is not supported "
                         "(between ZeRO-0 and ZeRO-1/2/3 the optimizer state has no common format): "
                         f"set deepspeed.zero_stage={saved_stage}")
    universal = saved_stage > 0 and (saved_world != world or saved_stage != stage)
    return ResumePlan(tag_dir, saved_world, saved_stage, universal)


def convert_to_universal(tag_dir: Path) -> Path:
    """``TAG/universal`` (DeepSpeed's universal format) of a ZeRO-1/2/3 checkpoint, converted if not there
    yet: into a temporary dir that is renamed when complete, so a kill leaves nothing that looks done."""
    out = tag_dir / UNIVERSAL
    if (out / MARKER).is_file():
        return out
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    for stale in [out, *tag_dir.glob(f".{UNIVERSAL}.*")]:  # left by a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(out) as tmp:
        args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()):  # its progress chatter
            ds_to_universal(args)
        write_marker(tmp, {"source": tag_dir.name})
    return out


def prepare_resume(plan: ResumePlan) -> None:
    """Collective: rank 0 writes the universal copy the plan needs while the others wait."""
    if plan.universal and (not dist.is_initialized() or dist.get_rank() == 0):
        convert_to_universal(plan.tag_dir)
    _barrier()


def load(engine, plan: ResumePlan) -> dict[str, Any]:
    """Load a planned checkpoint into ``engine`` (built with ``load_universal`` when the plan says so);
    restore this rank's RNG (rank r of a re-split run takes saved rank r mod the old world's); return the
    client state."""
    path, client_state = engine.load_checkpoint(str(plan.load_dir.parent), tag=plan.load_dir.name,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {plan.load_dir}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    set_rng_state(client_state["rng_states"][rank % len(client_state["rng_states"])])
    return client_state


# ---------------------------------------------------------------- preemption
def preemption_signals(configured: str) -> tuple[signal.Signals, ...]:
    """The signals that mean "checkpoint and stop": SIGTERM (SLURM preemption, scancel, the time limit,
    ``timeout``), SIGINT and ``configured`` (``checkpoint.preempt_signal``, a name such as USR1)."""
    return tuple(dict.fromkeys((signal.SIGTERM, signal.SIGINT, signal_from_name(configured))))


def signal_from_name(name: str) -> signal.Signals:
    """``USR1`` or ``SIGUSR1`` → signal.SIGUSR1; a ValueError naming the choices otherwise."""
    key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    if key in ("SIGKILL", "SIGSTOP"):
        raise UserError(f"{name!r} cannot be caught, so it cannot ask for a checkpoint; e.g. USR1 or USR2")
    try:
        return signal.Signals[key]
    except KeyError:
        raise UserError(f"unknown signal {name!r}; e.g. USR1, USR2, TERM, INT, HUP") from None


class PreemptionFlag:
    """Records the preemption signals (``preemption_signals``); the loop reads ``signum`` every step and
    checkpoints before exiting. A repeated signal changes nothing, so a second TERM during the save
    cannot interrupt it."""

    def __init__(self, configured: str = "USR1") -> None:
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in preemption_signals(configured)}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
