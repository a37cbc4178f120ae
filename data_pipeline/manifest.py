"""``manifest.json``: what a directory of token shards holds (see docs/CONTRACTS.md).

Format 2 adds the stored size next to the training size: ``resolution`` is the side the model trains
on (``tokens_per_sample`` = resolution²), ``margin`` the extra pixels the train split is stored with,
and each split's ``stored_resolution`` the side of its token grids (resolution + margin for ``train``,
resolution for the others, so validation and evals read exact-size images). Format 1 (no margin) reads
as format 2 with every split stored at the training size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from igpt.errors import UserError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
REQUIRED_KEYS = (
    "format_version",
    "resolution",
    "palette_sha256",
    "palette_file",
    "vocab_size",
    "splits",
    "class_names",
    "skipped",
    "skipped_counts",
)


def load_manifest(data_dir: str | os.PathLike) -> dict:
    """Read and check ``DATA_DIR/manifest.json``; shard paths stay relative to ``data_dir``."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_FILE} in {data_dir}: not a token-shard directory (run `igpt data shard`)")
    manifest = json.loads(path.read_text())
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise UserError(f"{path} lacks keys {missing}")
    if manifest["format_version"] not in READABLE_VERSIONS:
        raise UserError(f"{path} has format_version {manifest['format_version']}, this code reads "
                         f"{' and '.join(map(str, READABLE_VERSIONS))}")
    return manifest


class UnknownSplit(UserError, KeyError):
    """A split the manifest does not have (a ValueError for the CLI's one-line errors, a KeyError as before)."""

    __str__ = ValueError.__str__  # the message as is, not quoted like a KeyError's


def split_info(manifest: dict, split: str) -> dict:
    """The manifest entry of one split, with a clear error naming the splits that exist."""
    if split not in manifest["splits"]:
        raise UnknownSplit(f"split {split!r} not in the manifest (has {sorted(manifest['splits'])})")
    return manifest["splits"][split]


def stored_resolution(manifest: dict, split: str) -> int:
    """The side of a split's stored token grids: the training resolution plus the split's margin."""
    return int(split_info(manifest, split).get("stored_resolution", manifest["resolution"]))
