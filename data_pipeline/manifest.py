"""``manifest.json``: what a directory of token shards holds (see docs/CONTRACTS.md)."""
from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT_VERSION = 1
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
        raise ValueError(f"{path} lacks keys {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {manifest['format_version']}, this code reads {FORMAT_VERSION}")
    return manifest


class UnknownSplit(ValueError, KeyError):
    """A split the manifest does not have (a ValueError for the CLI's one-line errors, a KeyError as before)."""

    __str__ = ValueError.__str__  # the message as is, not quoted like a KeyError's


def split_info(manifest: dict, split: str) -> dict:
    """The manifest entry of one split, with a clear error naming the splits that exist."""
    if split not in manifest["splits"]:
        raise UnknownSplit(f"split {split!r} not in the manifest (has {sorted(manifest['splits'])})")
    return manifest["splits"][split]
