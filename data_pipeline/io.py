"""File writes that never leave a half-written file that looks complete, and file identities.

Every write goes to a temporary name in the destination's directory and is renamed into place only
when it succeeded (``os.replace`` is atomic on one filesystem); on failure the temporary is removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed to ``path`` when the block succeeds.

    The temporary keeps ``path``'s suffix, so writers that pick a format by suffix still work."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside ``path`` to fill; renamed to ``path`` (which must not exist or be
    empty) when the block succeeds, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to a temporary name in the same directory, then rename it into place."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(obj: object, path: str | os.PathLike) -> None:
    """Write JSON (indent 1, final newline) atomically, like ``write_text_atomic``."""
    write_text_atomic(json.dumps(obj, indent=1) + "\n", path)


def copy_atomic(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
