"""Where a training run's wall time goes: the step, loading batches, logging, validation, samples and
checkpoints, each measured on the host as exclusive seconds (a phase nested in another is not counted twice).

On CUDA the step is queued asynchronously, so the host's wait for it shows up where it reads the step's
record back; that read is timed as part of the step.
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("step", "data", "logging", "validation", "samples", "checkpoint")
OUTSIDE_TRAINING = ("validation", "samples", "checkpoint")  # what a plain loop's timer leaves out too
WALL_LINE = re.compile(r"^wall time ([\d.]+) s: (.*)$", re.M)


class WallTime:
    """Exclusive seconds per phase since construction; the rest of the wall time is ``other``."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._start = time.perf_counter()
        self._nested = 0.0  # seconds spent in phases nested inside the one now open

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the block's seconds, less those of phases opened inside it, towards ``name``."""
        start, outer = time.perf_counter(), self._nested
        self._nested = 0.0
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.seconds[name] += spent - self._nested
            self._nested = outer + spent

    def timed(self, items: Iterator, name: str) -> Iterator:
        """``items`` with the time spent producing each one counted towards ``name``."""
        while True:
            with self.phase(name):
                item = next(items, _END)
            if item is _END:
                return
            yield item

    def summary(self) -> tuple[dict[str, float], str]:
        """(metrics ``time_<phase>_s``, ``time_other_s`` and ``time_total_s``; the log line with each share)."""
        total = time.perf_counter() - self._start
        parts = {**self.seconds, "other": max(total - sum(self.seconds.values()), 0.0)}
        metrics = {f"time_{name}_s": s for name, s in parts.items()} | {"time_total_s": total}
        shares = " | ".join(f"{name} {100 * s / max(total, 1e-9):.1f}%" for name, s in parts.items())
        return metrics, f"wall time {total:.1f} s: {shares}"


def loop_seconds(seconds: dict[str, float]) -> float:
    """The training loop's seconds: the ``total`` of a breakdown less validation, samples and checkpoints."""
    return seconds["total"] - sum(seconds.get(name, 0.0) for name in OUTSIDE_TRAINING)


def read_wall_time(log: str) -> dict[str, float] | None:
    """The last ``wall time`` line of a training log's text as seconds per phase with ``total`` and ``loop``
    (``loop_seconds``); None without one. The line's shares are rounded to 0.1%."""
    found = WALL_LINE.findall(log)
    if not found:
        return None
    total, shares = found[-1]
    seconds = {"total": float(total)}
    for part in shares.split(" | "):
        name, share = part.rsplit(" ", 1)
        seconds[name] = float(total) * float(share.rstrip("%")) / 100
    return {**seconds, "loop": loop_seconds(seconds)}


_END = object()
