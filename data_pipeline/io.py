"""File writes that never leave a half-written file that looks complete, and file identities.

Every write goes to a temporary name in the destination's directory and is renamed into place only
when it succeeded (``os.replace`` is atomic on one filesystem); on failure the temporary is removed.
Durability: the temporary's data (every file and folder of a temporary directory) is fsynced before the
rename and the destination's directory after it, so after a power loss the name points at the whole file
or at the old one, never at a file whose data never reached the disk; and once a helper returns, what it
wrote survives a power loss, so a file written after it (a shard's record, a checkpoint's marker) never
outlives it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data (a file, or a directory's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # a few filesystems cannot fsync a directory; its entries are then as durable as it allows
        if not (err.errno in (errno.EINVAL, errno.ENOTSUP) and Path(path).is_dir()):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """``fsync_file`` every file and folder under ``path``, deepest first, then ``path`` itself."""
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            fsync_file(os.path.join(folder, name))
        fsync_file(folder)


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed to ``path`` when the block succeeds.

    The temporary keeps ``path``'s suffix, so writers that pick a format by suffix still work. With
    ``durable=False`` nothing is fsynced: for a file whose loss in a power cut costs only redone work."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_file(path.parent)
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
        fsync_tree(tmp)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
        fsync_file(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(text: str, path: str | os.PathLike, durable: bool = True) -> None:
    """Write ``text`` to a temporary name in the same directory, then rename it into place (``atomic_path``)."""
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text)


def write_json_atomic(obj: object, path: str | os.PathLike, durable: bool = True) -> None:
    """Write JSON (indent 1, final newline) atomically, like ``write_text_atomic``."""
    write_text_atomic(json.dumps(obj, indent=1) + "\n", path, durable)


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
