"""Where a training run's wall time goes: the step, loading batches, logging, validation, samples and
checkpoints, each measured on the host as exclusive seconds (a phase nested in another is not counted twice).

On CUDA the step is queued asynchronously, so the host's wait for it shows up where it reads the step's
record back; that read is timed as part of the step.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("step", "data", "logging", "validation", "samples", "checkpoint")


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


_END = object()
