"""``manifest.json``: what a directory of token shards holds (see docs/CONTRACTS.md), as a ``Manifest``.

Format 2 adds the stored size next to the training size: ``resolution`` is the side the model trains
on (``tokens_per_sample`` = resolution²), ``margin`` the extra pixels the train split is stored with,
and each split's ``stored_resolution`` the side of its token grids (resolution + margin for ``train``,
resolution for the others, so validation and evals read exact-size images). Format 1 (no margin) reads
as format 2 with every split stored at the training size.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from igpt.data_pipeline.io import write_json_atomic
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


class UnknownSplit(UserError, KeyError):
    """A split the manifest does not have (a ValueError for the CLI's one-line errors, a KeyError as before)."""

    __str__ = ValueError.__str__  # the message as is, not quoted like a KeyError's


@dataclass(frozen=True)
class ShardInfo:
    """One shard file of a split (relative to the shard directory) and its sample count."""

    file: str
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        """The shard's entry as written in ``manifest.json``."""
        return {"file": self.file, "num_samples": self.num_samples}


@dataclass(frozen=True)
class SplitInfo:
    """One split: its sample count, the side of its stored token grids and its shards in order."""

    num_samples: int
    stored_resolution: int
    shards: list[ShardInfo]

    def to_dict(self) -> dict[str, Any]:
        """The split's entry as written in ``manifest.json``."""
        return {"num_samples": self.num_samples, "stored_resolution": self.stored_resolution,
                "shards": [s.to_dict() for s in self.shards]}

    @classmethod
    def from_dict(cls, d: dict[str, Any], resolution: int) -> "SplitInfo":
        """A split entry read from JSON; without ``stored_resolution`` (format 1) it is ``resolution``."""
        return cls(num_samples=d["num_samples"], stored_resolution=d.get("stored_resolution", resolution),
                   shards=[ShardInfo(s["file"], s["num_samples"]) for s in d["shards"]])


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A token-shard directory's ``manifest.json``, always format 2 once read (fields in the file's key order).

    ``skipped`` lists ``{source, reason, detail}`` of inputs left out, ``skipped_counts`` counts them by
    reason, ``settings`` records the sharder's settings; ``num_inputs`` = samples + skipped (None when the
    file does not say)."""

    format_version: ClassVar[int] = FORMAT_VERSION
    resolution: int
    margin: int = 0
    palette_sha256: str
    palette_file: str
    vocab_size: int
    labelled: bool = False
    num_classes: int | None = None
    class_names: list[str] | None
    splits: dict[str, SplitInfo]
    num_inputs: int | None = None
    skipped: list[dict[str, Any]]
    skipped_counts: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_sample(self) -> int:
        """Tokens of one training sample: resolution²."""
        return self.resolution * self.resolution

    @classmethod
    def load(cls, data_dir: str | os.PathLike) -> "Manifest":
        """Read and check ``DATA_DIR/manifest.json``; shard paths stay relative to ``data_dir``."""
        path = Path(data_dir) / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST_FILE} in {data_dir}: not a token-shard directory (run `igpt data shard`)")
        raw = json.loads(path.read_text())
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise UserError(f"{path} lacks keys {missing}")
        if raw["format_version"] not in READABLE_VERSIONS:
            raise UserError(f"{path} has format_version {raw['format_version']}, this code reads "
                            f"{' and '.join(map(str, READABLE_VERSIONS))}")
        optional = {k: raw[k] for k in ("margin", "labelled", "num_classes", "num_inputs", "settings") if k in raw}
        return cls(
            resolution=raw["resolution"], palette_sha256=raw["palette_sha256"], palette_file=raw["palette_file"],
            vocab_size=raw["vocab_size"], class_names=raw["class_names"],
            splits={name: SplitInfo.from_dict(s, raw["resolution"]) for name, s in raw["splits"].items()},
            skipped=raw["skipped"], skipped_counts=raw["skipped_counts"], **optional,
        )

    def save(self, data_dir: str | os.PathLike) -> None:
        """Write ``DATA_DIR/manifest.json`` atomically (indent 1, final newline)."""
        write_json_atomic(self.to_dict(), Path(data_dir) / MANIFEST_FILE)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``manifest.json``, keys in the order they are written."""
        return {
            "format_version": self.format_version,
            "resolution": self.resolution,
            "margin": self.margin,
            "palette_sha256": self.palette_sha256,
            "palette_file": self.palette_file,
            "vocab_size": self.vocab_size,
            "tokens_per_sample": self.tokens_per_sample,
            "labelled": self.labelled,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "splits": {name: s.to_dict() for name, s in self.splits.items()},
            "num_inputs": self.num_inputs,
            "skipped": self.skipped,
            "skipped_counts": self.skipped_counts,
            "settings": self.settings,
        }

    def split(self, name: str) -> SplitInfo:
        """One split, with a clear error naming the splits that exist."""
        if name not in self.splits:
            raise UnknownSplit(f"split {name!r} not in the manifest (has {sorted(self.splits)})")
        return self.splits[name]

    def stored_resolution(self, split: str) -> int:
        """The side of a split's stored token grids: the training resolution plus the split's margin."""
        return self.split(split).stored_resolution
