"""What a training run has done so far: the part of a checkpoint's client state the loop owns."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TrainState:
    """Optimizer steps taken, tokens trained on (all ranks) and steps skipped as non-finite."""

    step: int = 0
    tokens_seen: int = 0
    nonfinite_total: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
