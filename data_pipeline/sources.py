"""Finding the input images: ImageFolder directories, raw-image WebDataset tars, globs.

A source string is brace-expanded (``shards-{000..009}.tar``), then glob-expanded when it has
wildcards. Each resulting path is a directory (ImageFolder when it has class sub-folders, a
flat folder of unlabelled images otherwise), a ``.tar`` of WebDataset samples (``KEY.jpg``,
``.jpeg``, ``.png``, ``.webp`` … with an optional ``KEY.cls`` integer label) or a single image
file. Every file found is an input; whether it is an image is decided when it is decoded.
"""
from __future__ import annotations

import glob
import mmap
import os
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
from braceexpand import braceexpand

from igpt.data_pipeline.decode import SkipImage, decode_image
from igpt.data_pipeline.tario import TarFormatError, iter_members, mapped_tar
from igpt.errors import UserError

MAX_LABEL_BYTES = 64  # a .cls holds a class index: a few ASCII digits
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")


class Item(NamedTuple):
    """One input image: a stable id (for the split hash and the output key), where its bytes are."""

    uid: str
    path: str
    offset: int  # -1: the whole file
    size: int
    label: int | None


class Skip(NamedTuple):
    source: str
    reason: str
    detail: str


class Found(NamedTuple):
    items: list[Item]
    skipped: list[Skip]
    class_names: list[str] | None


def expand_sources(sources: list[str]) -> list[str]:
    """Brace- and glob-expand source strings into existing paths; a clear error for any that match nothing."""
    if not sources:
        raise UserError("no data sources given")
    paths = []
    for source in sources:
        for pattern in braceexpand(str(source)):
            if glob.has_magic(pattern):
                hits = sorted(glob.glob(pattern, recursive=True))
                if not hits:
                    raise FileNotFoundError(f"data source {pattern!r} matches no files")
                paths.extend(hits)
            elif os.path.exists(pattern):
                paths.append(pattern)
            else:
                raise FileNotFoundError(f"data source {pattern!r} does not exist")
    return paths


def _walk(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _folder(root: Path, label_of: dict[str, int] | None) -> tuple[list[Item], list[Skip]]:
    items, skipped = [], []
    for p in _walk(root):
        rel = p.relative_to(root)
        label = None
        if label_of is not None:
            if len(rel.parts) < 2:
                skipped.append(Skip(str(p), "outside-class-folder", "file at the top of an ImageFolder"))
                continue
            label = label_of[rel.parts[0]]
        items.append(Item(f"{root.name}/{rel.as_posix()}", str(p), -1, p.stat().st_size, label))
    return items, skipped


def _tar(path: Path) -> tuple[list[Item], list[Skip]]:
    """Group tar members into WebDataset samples by key (the name up to the first dot of the basename).

    A malformed header ends the listing: the samples before it are kept, the rest of the tar (with the
    sample being read, whose members may be incomplete) is one input skipped as ``bad-tar``."""
    try:
        with mapped_tar(path) as tar:
            return _tar_samples(path, tar)
    except OSError as e:
        raise UserError(f"data source {path} is not a readable tar: {e}") from e


def _tar_samples(path: Path, tar: bytes | mmap.mmap) -> tuple[list[Item], list[Skip]]:
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    items, skipped = [], []
    try:
        for name, offset, size in iter_members(tar, str(path)):
            head, _, base = name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            key = f"{head}/{stem}" if head else stem
            samples.setdefault(key, {})[ext.lower()] = (offset, size)
    except TarFormatError as e:
        if samples:
            samples.popitem()
        skipped.append(Skip(str(path), "bad-tar", f"{e}; the rest of the tar is skipped"))
    for key, parts in samples.items():
        where = f"{path}:{key}"
        ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if ext is None:
            skipped.append(Skip(where, "no-image", f"members {sorted(parts)}"))
            continue
        label = None
        if "cls" in parts:
            off, size = parts["cls"]
            text = tar[off : off + min(size, MAX_LABEL_BYTES)]
            if size > MAX_LABEL_BYTES or not text.strip().isdigit():
                skipped.append(Skip(where, "bad-label", f".cls of {size} bytes holds {text[:40]!r}, not a class index"))
                continue
            label = int(text)
        offset, size = parts[ext]
        items.append(Item(key, str(path), offset, size, label))
    return items, skipped


def find_images(sources: list[str]) -> Found:
    """Every input of every source, in a deterministic order, plus inputs rejected while listing."""
    items: list[Item] = []
    skipped: list[Skip] = []
    class_names: list[str] | None = None
    for path_str in expand_sources(sources):
        path = Path(path_str)
        if path.is_dir():
            subdirs = sorted(d.name for d in path.iterdir() if d.is_dir())
            label_of = {name: i for i, name in enumerate(subdirs)} if subdirs else None
            if subdirs:
                if class_names is not None and class_names != subdirs:
                    raise UserError(f"ImageFolder {path} has classes {subdirs}, another source has {class_names}")
                class_names = subdirs
            found, bad = _folder(path, label_of)
        elif path.name.endswith((".tar", ".tar.gz", ".tgz")):
            found, bad = _tar(path)
        else:
            found, bad = [Item(path.as_posix(), str(path), -1, path.stat().st_size, None)], []
        if not found and not bad:
            raise UserError(f"data source {path} holds no images")
        items.extend(found)
        skipped.extend(bad)
    if not items:
        first = f"; the first, {skipped[0].reason}: {skipped[0].detail}" if skipped else ""
        raise UserError(f"data sources {sources} hold no images ({len(skipped)} inputs rejected{first})")
    return Found(items, skipped, class_names)


def read_item(item: Item, fds: dict[str, int]) -> bytes:
    """The encoded bytes of an item; ``fds`` caches open tar file descriptors."""
    if item.offset < 0:
        with open(item.path, "rb") as f:
            return f.read()
    fd = fds.get(item.path)
    if fd is None:
        fd = fds[item.path] = os.open(item.path, os.O_RDONLY)
    return os.pread(fd, item.size, item.offset)


def decoded_images(items: Iterable[Item], resolution: int) -> Iterator[np.ndarray]:
    """Each item decoded as the shards decode it, (resolution, resolution, 3) uint8; undecodable ones are
    skipped. The tar files opened on the way are closed when the iteration ends."""
    fds: dict[str, int] = {}
    try:
        for item in items:
            try:
                yield decode_image(read_item(item, fds), resolution)
            except SkipImage:
                continue
    finally:
        for fd in fds.values():
            os.close(fd)
