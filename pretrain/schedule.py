"""Learning rate: linear warmup from 0, then cosine decay to ``min_lr`` at ``total_steps``.

A pure function of the step, so a resumed run needs no scheduler state to land on the same rate.
"""
from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """The rate for optimizer step ``step`` (0-based): ``lr·(step+1)/warmup`` while warming up, then cosine."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
