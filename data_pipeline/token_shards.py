"""A token-shard directory opened once: its manifest, its palette and the palette's checked identity.

The palette identity (the sha256 of ``palette.npy``'s bytes) ties shards, checkpoints and releases
together; ``check_palette`` is the one comparison every stage makes between two of them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from igpt.data_pipeline.manifest import Manifest
from igpt.data_pipeline.palette import load_palette
from igpt.errors import UserError


class PaletteMismatch(UserError):
    """Two things that must share a palette (shards, a checkpoint, a release, a palette file) do not."""


def check_palette(expected: str | None, actual: str | None, what: str,
                  error: type[ValueError] = PaletteMismatch) -> None:
    """Raise ``error`` naming ``what`` unless the two palette sha256 identities are the same."""
    if expected != actual:
        raise error(f"palette mismatch: {what} (sha256 {expected} against {actual})")


@dataclass(frozen=True)
class TokenShards:
    """A directory written by ``igpt data shard``; ``open`` checks its palette file against the manifest."""

    path: Path
    manifest: Manifest
    palette: np.ndarray  # (K, 3) uint8
    palette_sha256: str

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TokenShards":
        path = Path(path)
        manifest = Manifest.load(path)
        palette, sha = load_palette(path / manifest.palette_file)
        check_palette(manifest.palette_sha256, sha,
                      f"{path / manifest.palette_file} is not the palette {path}/manifest.json names")
        return cls(path, manifest, palette, sha)

    @property
    def resolution(self) -> int:
        """The training resolution of the shards."""
        return self.manifest.resolution
