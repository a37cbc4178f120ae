"""DeepSpeed checkpoints with a completeness marker, retention, resume selection and preemption.

Layout: ``RUN_DIR/checkpoints/step_00000100/`` (DeepSpeed files from every rank) and
``RUN_DIR/checkpoints/latest`` (DeepSpeed's pointer). After every rank has written its files,
rank 0 writes ``COMPLETE.json`` last: the step, world size, palette sha256 and the size and
sha256 of every file. A tag without a marker, or whose files do not match it, is incomplete or
corrupt: ``find_resumable`` skips it with a warning and never loads it.

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
agrees on it across ranks within a step, saves a checkpoint and exits with
``checkpoint.preempt_exit_code`` (default 124), which a launcher or SLURM ``--requeue`` wrapper treats
as "requeue me". DataLoader workers ignore these signals (``igpt.data_pipeline.loader``), so a signal sent
to the whole process group reaches the ranks without killing their loaders.

Reading weights without an engine (``igpt export``, ``igpt.pretrain.release.load_model``): ``resolve_tag``
picks a run's checkpoint, ``consolidated_state_dict`` its fp32 ``IGPT`` state dict. ZeRO-1/2/3 checkpoints
are consolidated with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (from the fp32 master
partitions of every rank); ZeRO-0 checkpoints hold the full module already.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from igpt.data_pipeline.io import atomic_dir, file_sha256, fsync_tree, write_json_atomic
from igpt.errors import UserError

MARKER = "COMPLETE.json"
TAG_RE = re.compile(r"^step_(\d{8,})$")
UNIVERSAL = "universal"  # the universal-format copy of a tag, inside the tag dir
MODULE_PREFIX = "model."  # the training engine wraps IGPT in LossModule


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


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 ``IGPT`` state dict of a checkpoint of any ZeRO stage (loaded from our own trusted files)."""
    info = verify(tag_dir, check_sha256=False)
    if info["zero_stage"] == 0:
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = states["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k.removeprefix(MODULE_PREFIX): v.detach().float().contiguous().clone() for k, v in sd.items()}


# ---------------------------------------------------------------- save / load through the engine
def save(engine, run_dir: str | os.PathLike, step: int, client_state: dict[str, Any], *, loader_state: Any,
         keep_last: int) -> Path:
    """Collective: every rank writes its DeepSpeed shards, then rank 0 writes the marker and prunes."""
    tag = tag_for(step)
    root = checkpoints_dir(run_dir)
    state = dict(client_state)
    state["loader_states"] = gather_per_rank(loader_state)
    state["rng_states"] = gather_per_rank(rng_state())
    state["world_size"] = len(state["loader_states"])
    engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=True)
    _barrier()
    if engine.global_rank == 0:
        write_marker(root / tag, {"step": step, "world_size": state["world_size"],
                                  "palette_sha256": client_state.get("palette_sha256"),
                                  "zero_stage": engine.zero_optimization_stage()})
        prune(run_dir, keep_last)
    _barrier()
    return root / tag


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


def plan_resume(tag_dir: Path, world: int, stage: int) -> ResumePlan:
    """How to resume from the verified checkpoint ``tag_dir`` at ``world`` ranks and ZeRO ``stage``."""
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
