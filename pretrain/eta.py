"""The remaining time of a loop at its pace so far, for the training log line."""
from __future__ import annotations


def format_duration(seconds: float) -> str:
    """``37s``, ``4m12s``, ``1h02m``, ``2d03h``: two units at most."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_eta(steps_done: int, steps_total: int, seconds: float) -> str:
    """``ETA 4m12s``: ``steps_total - steps_done`` steps left at the pace of the ``steps_done`` that took
    ``seconds`` (count both from where this process started, so a resumed run is paced on its own steps)."""
    if steps_done <= 0 or seconds <= 0:
        return "ETA --"
    return f"ETA {format_duration(seconds / steps_done * max(0, steps_total - steps_done))}"
