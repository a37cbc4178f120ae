"""The training loop's checkpoint policy: when to save (cadence, retention), which checkpoint to resume
and whether it fits the run, and the preemption signal that asks for one last save.

The format (DeepSpeed files, completeness marker, universal conversion) is ``igpt.pretrain.checkpoint``'s.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from igpt.data_pipeline.io import write_text_atomic
from igpt.data_pipeline.token_shards import check_palette
from igpt.errors import UserError
from igpt.pretrain import checkpoint as ckpt
from igpt.pretrain.config import MODEL_FIELDS, TrainConfig, config_from_checkpoint, to_dict
from igpt.pretrain.state import TrainState

# The environment variable naming the file in which every rank notes a completed preemption checkpoint (the
# SLURM node task sets it and requeues the job only when the note is there: ``igpt.cluster.slurm``).
PREEMPTED_NOTE_ENV = "IGPT_PREEMPTED_NOTE"


class Checkpointer:
    """Saves, resumes and listens for preemption for one rank of a run (``cfg`` is the resolved config)."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, log: Callable[[str], None]) -> None:
        self.cfg, self.rank, self.world, self.log = cfg, rank, world, log
        self.run_dir = Path(cfg.train.run_dir)
        self.every, self.keep_last = cfg.checkpoint.every, cfg.checkpoint.keep_last
        self.preemption = ckpt.PreemptionFlag(cfg.checkpoint.preempt_signal)

    # ---------------------------------------------------------------- cadence and preemption
    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.cfg.train.steps

    @property
    def preemption_requested(self) -> bool:
        """Whether this process received a preemption signal (the loop all-reduces it)."""
        return self.preemption.signum is not None

    def signal_name(self) -> str:
        signum = self.preemption.signum
        return signal.Signals(signum).name if signum else "another rank"

    def note_preempted(self, step: int) -> None:
        """After this step's preemption checkpoint is complete: say so in ``$IGPT_PREEMPTED_NOTE`` (if set)."""
        note = os.environ.get(PREEMPTED_NOTE_ENV)
        if note:
            write_text_atomic(f"preempted at step {step}, checkpoint {ckpt.tag_for(step)} complete\n", note)

    def close(self) -> None:
        self.preemption.restore()

    # ---------------------------------------------------------------- save
    def save(self, engine, state: TrainState, palette_sha256: str, loader_state: Any) -> Path:
        """Collective: this step's checkpoint, then the oldest beyond ``keep_last`` removed."""
        t0 = time.time()
        client = {**state.state_dict(), "config": to_dict(self.cfg), "palette_sha256": palette_sha256}
        path = ckpt.save(engine, self.run_dir, state.step, client, loader_state=loader_state, keep_last=self.keep_last)
        self.log(f"checkpoint {path} ({time.time() - t0:.1f} s)")
        return path

    # ---------------------------------------------------------------- resume
    def plan(self, resume: str, zero_stage: int, trust: bool = False) -> ckpt.ResumePlan | None:
        """The checkpoint to resume from (``auto``: the newest complete one; else the given tag dir) and how,
        the same on every rank (rank 0 chooses), with its universal copy written when the plan needs one. Every
        rank refuses a checkpoint that ``ckpt.check_trusted`` (with ``trust``) does not allow."""
        check = self.cfg.checkpoint.verify_sha256
        candidates: list[Path] = []
        if resume != "auto":  # every rank checks, so a bad path fails everywhere and no rank waits
            ckpt.verify(Path(resume), check)
            candidates = [Path(resume)]
        elif self.rank == 0:  # rank 0 chooses (warning once about skipped tags); every rank loads its choice
            candidates = ckpt.find_resumable(self.run_dir, check)
        candidates = ckpt.gather_per_rank([str(c) for c in candidates])[0]
        if not candidates:
            self.log(f"resume auto: no complete checkpoint in {self.run_dir}, starting from step 0")
            return None
        plan = ckpt.plan_resume(Path(candidates[0]), self.world, zero_stage, trust)
        ckpt.prepare_resume(plan)
        return plan

    def restore(self, engine, plan: ckpt.ResumePlan, palette_sha256: str, state: TrainState, stream) -> None:
        """Load the planned checkpoint into ``engine``, ``state`` and ``stream`` after checking that it fits
        this run (palette, model); the data stream re-splits when the layout changed."""
        client = ckpt.load(engine, plan)
        check_palette(client["palette_sha256"], palette_sha256, f"checkpoint {plan.tag_dir} and the training data")
        saved = config_from_checkpoint(client["config"], f"checkpoint {plan.tag_dir}")
        changed = [k for k in MODEL_FIELDS if getattr(saved.model, k) != getattr(self.cfg.model, k)]
        if changed:
            raise UserError(f"checkpoint {plan.tag_dir} has a different model ({changed}); cannot resume")
        state.load_state_dict(client)
        data = stream.resume_from(client["loader_states"])
        self.log(f"resumed from {plan.tag_dir} at step {state.step} ({state.tokens_seen} tokens seen)")
        stage = engine.zero_optimization_stage()
        if plan.saved_world != self.world or plan.saved_stage != stage:
            before, after = saved.global_batch(plan.saved_world), self.cfg.global_batch(self.world)
            batch = f"global batch {before} → {after} sequences" + ("" if before == after else
                                                                    " (set train.grad_accum to keep it)")
            self.log(f"elastic resume: {plan.describe(self.world, stage)}; {batch}; data: {data}")
