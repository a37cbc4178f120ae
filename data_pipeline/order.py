"""The random patch orders of ``model.order: random``: one permutation of a sample's patches per epoch.

Like the augmentation (``igpt.data_pipeline.augment``), a sample's order is a pure function of (seed, epoch, shard
index, position in the shard), drawn in the loader's workers, so it travels with the batch (``batch["order"]``)
and a resumed or re-split stream gives every sample the order the uninterrupted stream gives it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Hashable

import numpy as np


@dataclass(frozen=True)
class PatchOrder:
    """Permutations of ``patches`` patch positions, keyed by ``seed``."""

    patches: int
    seed: int = 0

    def __call__(self, epoch: Hashable, shard: int, index: int) -> np.ndarray:
        """The (patches,) int64 permutation of sample ``index`` of shard ``shard`` in ``epoch``."""
        digest = hashlib.blake2b(f"order/{self.seed}/{epoch}/{shard}/{index}".encode(), digest_size=8).digest()
        return np.random.default_rng(int.from_bytes(digest, "big")).permutation(self.patches)
