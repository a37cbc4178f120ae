"""Exact augmentations of palette-token grids: horizontal flips and crops.

Palette quantisation maps every pixel on its own, so the flip or crop of a token grid is exactly the
token grid of the flipped or cropped image. Train splits stored with a margin (``igpt data shard
--margin M``: each image decoded at the training side R and mirror-padded to R + M, ``pad_margin``) are
cut to R: at a random offset in [0, M]² with ``random_crop`` (a shift of up to M/2 pixels, borders
mirrored, as CIFAR training usually does), else at the centre (offset M // 2), which is the image
itself. A sample's draws are a pure function of (seed, epoch, shard index, position in the shard):
they do not depend on the world size, the workers, the batch size or the order, so a resumed or
re-split stream augments every sample exactly as the uninterrupted stream does.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Hashable

import numpy as np

from igpt.errors import UserError


def pad_margin(image: np.ndarray, margin: int) -> np.ndarray:
    """An (R, R, 3) image mirror-padded to (R + margin)²: margin // 2 pixels before, the rest after, so the
    crop at offset margin // 2 is the image."""
    before = margin // 2
    pad = (before, margin - before)
    return np.pad(image, (pad, pad, (0, 0)), mode="reflect") if margin else image


def crop_flip(tokens: np.ndarray, stored: int, resolution: int, dy: int, dx: int, flip: bool) -> np.ndarray:
    """The (resolution², ) raster of a stored (stored², ) grid cropped at (dy, dx), mirrored left-right if ``flip``."""
    grid = tokens.reshape(stored, stored)[dy : dy + resolution, dx : dx + resolution]
    return np.ascontiguousarray(grid[:, ::-1] if flip else grid).reshape(-1)


@dataclass(frozen=True)
class Augment:
    """The crop (random or centre) and optional flip of one split's samples; see the module docstring."""

    resolution: int  # the training side
    stored: int  # the stored side (resolution + margin)
    hflip: bool = False
    random_crop: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.stored < self.resolution:
            raise UserError(f"stored side {self.stored} is smaller than the training side {self.resolution}")
        if self.random_crop and self.stored == self.resolution:
            raise UserError("random crops need token shards stored with a margin (igpt data shard --margin M); "
                             f"these are stored at the training size {self.resolution}")

    @property
    def identity(self) -> bool:
        """Whether every sample passes unchanged."""
        return self.stored == self.resolution and not self.hflip

    def draw(self, epoch: Hashable, shard: int, index: int) -> tuple[int, int, bool]:
        """(dy, dx, flip) of sample ``index`` of shard ``shard`` in ``epoch``."""
        margin = self.stored - self.resolution
        if not (self.hflip or self.random_crop):
            return margin // 2, margin // 2, False
        digest = hashlib.blake2b(f"augment/{self.seed}/{epoch}/{shard}/{index}".encode(), digest_size=8).digest()
        h = int.from_bytes(digest, "big")
        flip, h = bool(h & 1) and self.hflip, h >> 1
        if not self.random_crop:
            return margin // 2, margin // 2, flip
        return h % (margin + 1), h // (margin + 1) % (margin + 1), flip

    def __call__(self, tokens: np.ndarray, epoch: Hashable, shard: int, index: int) -> np.ndarray:
        """A sample's (resolution², ) tokens in ``epoch``."""
        if self.identity:
            return tokens
        return crop_flip(tokens, self.stored, self.resolution, *self.draw(epoch, shard, index))
