"""What the training loop reports: per-step records read back from the device without a host sync
per step, and the log window that turns them into the log line and the tracked metrics.

A step leaves one small device tensor (loss, skipped, grad norm, preemption requested). On CUDA
``StepRecords`` copies it to page-locked memory asynchronously and reads it one step later, when
the GPU has finished that step and is busy with the next one, so the host never waits for the
step it has just queued. On CPU there is nothing to wait for and records are read at once.
``pop(flush=True)`` reads all of them (one sync) at log, validation and checkpoint boundaries.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from igpt.pretrain.tracking import mfu

RECORD_FIELDS = ("loss", "skipped", "grad_norm", "preempt")


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as the host sees it; ``loss`` is the mean over micro-batches and ranks (NaN if skipped)."""

    step: int
    lr: float
    loss: float
    skipped: bool
    grad_norm: float
    preempt: bool


class StepRecords:
    """FIFO of per-step device tensors laid out as ``RECORD_FIELDS``, read back ``lag`` steps late."""

    def __init__(self, device: str) -> None:
        self.lag = 1 if device == "cuda" else 0
        self._pending: deque[tuple[int, float, Tensor, torch.cuda.Event | None]] = deque()

    def push(self, step: int, lr: float, values: Tensor) -> None:
        """Queue the record of ``step``; on CUDA its copy to the host starts now, asynchronously."""
        event = None
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        self._pending.append((step, lr, values, event))

    def pop(self, flush: bool = False) -> list[StepRecord]:
        """The records that are due (all of them with ``flush``), oldest first."""
        out = []
        while len(self._pending) > (0 if flush else self.lag):
            step, lr, values, event = self._pending.popleft()
            if event is not None:
                event.synchronize()
            loss, skipped, grad_norm, preempt = values.tolist()
            out.append(StepRecord(step, lr, loss, skipped > 0, grad_norm, preempt > 0))
        return out


def loss_unit(loss: float, likelihood: bool) -> str:
    """How a loss is shown beside its value: ``1.234 bpp`` for nats/token, ``MSE`` for a pixels target."""
    return f"{loss / math.log(2):.3f} bpp" if likelihood else "MSE"


def format_eta(seconds: float) -> str:
    """``1h02m``, ``4m05s`` or ``12s`` (``?`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class MetricsWindow:
    """Losses, tokens and training seconds since the last log line (validation and checkpoints excluded)."""

    def __init__(self, flops_per_token: float, world_size: int, peak_flops: float, total_steps: int,
                 likelihood: bool = True) -> None:
        self.flops_per_token, self.world_size, self.peak = flops_per_token, world_size, peak_flops
        self.total_steps = total_steps
        self.likelihood = likelihood  # the loss is nats/token (shown in bits per pixel too), else an MSE
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.loss_steps, self.steps, self.tokens, self.pixels, self.seconds = 0.0, 0, 0, 0, 0, 0.0

    def add_step(self, record: StepRecord, tokens: int, pixels: int) -> None:
        """Book a step of ``tokens`` sequence positions (pixels or patches) covering ``pixels`` image pixels."""
        self.steps += 1
        self.tokens += tokens
        self.pixels += pixels
        if not record.skipped:
            self.loss_sum += record.loss
            self.loss_steps += 1

    def add_seconds(self, seconds: float) -> None:
        self.seconds += seconds

    def close(self, record: StepRecord, *, tokens_seen: int, nonfinite_total: int, memory_gb: float) -> tuple[dict, str]:
        """(metrics to track, the log line) at ``record``'s step; the window starts afresh."""
        loss = self.loss_sum / self.loss_steps if self.loss_steps else float("nan")
        tok_s, px_s = self.tokens / max(self.seconds, 1e-9), self.pixels / max(self.seconds, 1e-9)
        util = mfu(tok_s, self.flops_per_token, self.world_size, self.peak)
        eta = (self.total_steps - record.step) * self.seconds / self.steps if self.steps else float("nan")
        metrics = {"loss": loss, **({"bpp": loss / math.log(2)} if self.likelihood else {}), "lr": record.lr,
                   "grad_norm": record.grad_norm, "tokens_per_s": tok_s, "pixels_per_s": px_s, "mfu": util,
                   "memory_gb": memory_gb, "tokens_seen": tokens_seen, "nonfinite_steps": nonfinite_total}
        line = (f"step {record.step:>6}/{self.total_steps} | loss {loss:.4f} ({loss_unit(loss, self.likelihood)}) | "
                f"lr {record.lr:.2e} | gnorm {record.grad_norm:.3f} | {tok_s / 1e3:.1f}k tok/s | "
                f"{'' if self.pixels == self.tokens else f'{px_s / 1e3:.1f}k px/s | '}"
                f"MFU {100 * util:.2f}% | mem {memory_gb:.2f} GB | skipped {nonfinite_total} | "
                f"ETA {format_eta(eta)}")
        self._reset()
        return metrics, line
