"""CIFAR-10 where no local copy exists: the official binary archive, downloaded and converted once.

``ensure_cifar10(cache)`` downloads ``cifar-10-binary.tar.gz`` (resuming an interrupted download
with an HTTP Range request), checks its published md5 (also of an archive already in the cache, which
is refused, not replaced, when it differs), converts the five training batches to
raw-image WebDataset tars and caches them; the test batch is left out (the pipeline holds out its
own validation split). Each archive record is 1 label byte and 3,072 pixel bytes: the R, G and B
planes of a 32×32 image. The tars hold ``cifar10_train_NNNNN.png`` (lossless) + ``.cls`` in
archive order, 5,000 per tar, named ``cifar10-train-NNNNNN.tar`` like ``../shared``'s copy; the
conversion's ``cifar10.json`` is written last and marks it complete.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import itertools
import os
import re
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from igpt.data_pipeline.io import write_bytes_atomic, write_json_atomic
from igpt.data_pipeline.progress import bar
from igpt.data_pipeline.tario import tar_bytes
from igpt.errors import UserError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
ARCHIVE = "cifar-10-binary.tar.gz"
BATCH_DIR = "cifar-10-batches-bin"
TRAIN_BATCHES = tuple(f"{BATCH_DIR}/data_batch_{i}.bin" for i in range(1, 6))
META = f"{BATCH_DIR}/batches.meta.txt"
RECORD = 1 + 3 * 32 * 32
BATCH_BYTES = 10000 * RECORD  # the official batches' size: the most read of a member
META_BYTES = 4096  # batches.meta.txt: ten class names
PER_TAR = 5000
MARKER = "cifar10.json"
TAR_GLOB = "cifar10-train-*.tar"
CHUNK = 1 << 20

Log = Callable[[str], None]


class DownloadError(UserError):
    """The archive could not be fetched or is not the one expected (message says what to do)."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/igpt/cifar10``, else ``~/.cache/igpt/cifar10``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "igpt" / "cifar10"


def file_md5(path: str | os.PathLike) -> str:
    """md5 hex digest of a file's bytes."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _open(url: str, offset: int) -> http.client.HTTPResponse:
    headers = {"User-Agent": "igpt", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing after `offset`: the partial file is already whole
            raise
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot download {url} ({reason})") from e


def download(url: str, dest: Path, md5: str, log: Log) -> Path:
    """Fetch ``url`` to ``dest`` through ``dest.part`` (kept when interrupted, resumed next time), check its md5.

    A file whose md5 differs is deleted, and the error says so."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    try:
        resp = _open(url, offset)
    except urllib.error.HTTPError:
        resp = None  # 416 on resume: the partial file holds everything
    if resp is not None:
        with resp:
            if offset and resp.status != 206:
                log(f"cifar10: {url} ignored the resume request; starting again")
                offset = 0
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            log(f"cifar10: downloading {url}" + (f" (resuming at {offset / 1e6:.1f} MB)" if offset else ""))
            got = offset
            with open(part, "ab" if offset else "wb") as f, \
                    bar(total=total, initial=offset, desc="download", unit="B", unit_scale=True) as b:
                try:
                    for block in iter(lambda: resp.read(CHUNK), b""):
                        f.write(block)
                        got += len(block)
                        b.update(len(block))
                except (OSError, http.client.HTTPException) as e:
                    raise DownloadError(f"download of {url} interrupted at {got / 1e6:.1f} MB ({e}); "
                                        f"rerun to resume from {part}") from e
            if total is not None and got < total:
                raise DownloadError(f"download of {url} interrupted at {got / 1e6:.1f} of {total / 1e6:.1f} MB; "
                                    f"rerun to resume from {part}")
    digest = file_md5(part)
    if digest != md5:
        part.unlink()
        raise DownloadError(f"{url}: md5 {digest} does not match the expected {md5}; the download was deleted "
                            "(rerun to fetch it again)")
    os.replace(part, dest)
    log(f"cifar10: downloaded {dest.stat().st_size / 1e6:.1f} MB, md5 {md5} verified")
    return dest


def read_batches(archive: Path) -> tuple[list[bytes], list[str]]:
    """The five training batches (bytes, in order) and the class names of a CIFAR-10 binary archive."""
    limit = {**dict.fromkeys(TRAIN_BATCHES, BATCH_BYTES), META: META_BYTES}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tf:
            for member in tf:
                if member.name in limit and member.isfile():
                    if member.size > limit[member.name]:
                        raise UserError(f"{archive}:{member.name} is {member.size} bytes, more than CIFAR-10's "
                                        f"{limit[member.name]}: not the CIFAR-10 binary archive")
                    found[member.name] = tf.extractfile(member).read()
                    if len(found) == len(limit):
                        break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(f"{archive} is not a readable CIFAR-10 binary archive ({e})") from e
    missing = sorted(set(limit) - set(found))
    if missing:
        raise UserError(f"{archive} lacks {missing}: not the CIFAR-10 binary archive (cifar-10-binary.tar.gz)")
    for name in TRAIN_BATCHES:
        if len(found[name]) % RECORD:
            raise UserError(f"{archive}:{name} is {len(found[name])} bytes, not a whole number of "
                             f"{RECORD}-byte records")
    try:
        names = [line.strip() for line in found[META].decode().splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"{archive}:{META} is not text ({e})") from None
    return [found[name] for name in TRAIN_BATCHES], names


def _png(pixels: bytes | memoryview) -> bytes:
    rgb = np.frombuffer(pixels, dtype=np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _members(batches: list[bytes], n_classes: int) -> Iterator[tuple[tuple[str, bytes], tuple[str, bytes]]]:
    """(PNG member, label member) of every record, numbered across the batches in order."""
    i = 0
    for batch in batches:
        view = memoryview(batch)
        for pos in range(0, len(batch), RECORD):
            label = view[pos]
            if label >= n_classes:
                raise UserError(f"record {i} has label {label}, beyond the {n_classes} classes")
            key = f"cifar10_train_{i:05d}"
            yield (f"{key}.png", _png(view[pos + 1:pos + RECORD])), (f"{key}.cls", b"%d" % label)
            i += 1


def convert(archive: Path, out_dir: Path, log: Log, per_tar: int = PER_TAR) -> dict:
    """Write the training images of ``archive`` as raw-image WebDataset tars in ``out_dir``; return the marker."""
    batches, names = read_batches(archive)
    n = sum(len(b) for b in batches) // RECORD
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    samples = _members(batches, len(names))
    with bar(total=n, desc="convert", unit="img") as b:
        for index in range(-(-n // per_tar)):
            chunk = list(itertools.islice(samples, per_tar))
            name = f"cifar10-train-{index:06d}.tar"
            write_bytes_atomic(tar_bytes(m for pair in chunk for m in pair), out_dir / name)
            files.append(name)
            b.update(len(chunk))
    marker = {"images": n, "class_names": names, "files": files, "archive_md5": file_md5(archive)}
    write_json_atomic(marker, out_dir / MARKER)
    log(f"cifar10: converted {n:,} training images to {len(files)} tar{'s' * (len(files) != 1)} in {out_dir}")
    return marker


def ensure_cifar10(cache: str | os.PathLike, url: str = URL, md5: str = MD5, log: Log = print) -> str:
    """Raw-image tars of CIFAR-10's training split under ``cache`` (downloaded and converted if needed);
    returns their glob pattern, a source for ``igpt palette fit`` / ``igpt data shard``."""
    if not re.fullmatch(r"[0-9a-fA-F]{32}", md5):
        raise UserError(f"the CIFAR-10 md5 must be 32 hex digits (--data-md5, $IGPT_CIFAR10_MD5), got {md5!r}")
    md5 = md5.lower()
    cache = Path(cache).expanduser().resolve()
    out = cache / f"train-{md5[:12]}"
    if (out / MARKER).is_file():
        log(f"cifar10: using the converted copy in {out}")
        return str(out / TAR_GLOB)
    archive = cache / f"{md5[:12]}-{ARCHIVE}"
    if not archive.is_file():
        download(url, archive, md5, log)
    elif (digest := file_md5(archive)) != md5:
        raise DownloadError(f"{archive}: md5 {digest} does not match the expected {md5}; it was left as it is: "
                            "delete it to download the archive again")
    convert(archive, out, log)
    archive.unlink()  # the tars hold everything the pipeline reads
    return str(out / TAR_GLOB)
