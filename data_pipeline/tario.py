"""Minimal, fast tar reading and writing for WebDataset shards (plain, uncompressed tars).

Reading walks the 512-byte headers directly (ustar, GNU long names and pax ``path``/``size``
records are understood), which is several times faster than ``tarfile`` for the many small
members of a shard. Writing produces deterministic ustar members (mtime 0, mode 0644).
"""
from __future__ import annotations

import mmap
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from igpt.errors import UserError

BLOCK = 512
MAX_EXTENDED = 1 << 20  # the largest GNU long-name or pax header read
_OCTAL = re.compile(rb"[0-7]+")


class TarFormatError(UserError):
    """A file that is not a readable plain tar archive."""


def _num(field: bytes) -> int:
    """A header number: octal digits (space/NUL padded) or GNU base-256; ValueError for anything else."""
    if field and field[0] & 0x80:  # GNU base-256 for large values (0xFF, a negative number, is refused)
        if field[0] != 0x80:
            raise ValueError(f"negative base-256 number {field.hex()}")
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip(b" ")
    if field and not _OCTAL.fullmatch(field):
        raise ValueError(f"not an octal number: {field[:16]!r}")
    return int(field, 8) if field else 0


def _pax(payload: bytes, member: str) -> dict[str, str]:
    """The ``LEN KEY=VALUE\\n`` records of a pax header; TarFormatError naming ``member`` for a bad one."""
    out, pos, end = {}, 0, len(payload.rstrip(b"\0"))
    while pos < end:
        space = payload.find(b" ", pos, pos + 21)
        digits = payload[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        if length <= len(digits) + 1 or pos + length > end or payload[pos + length - 1] != 0x0A:
            raise TarFormatError(f"{member}: bad pax record at byte {pos} of its extended header")
        key, eq, value = payload[space + 1 : pos + length - 1].partition(b"=")
        if not eq:
            raise TarFormatError(f"{member}: pax record at byte {pos} has no '='")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    size = out.get("size", "0")
    if not (size.isascii() and size.isdigit()):
        raise TarFormatError(f"{member}: pax size {size[:20]!r} is not a non-negative decimal number")
    return out


def _parse(read_at, total: int, where: str) -> Iterator[tuple[str, int, int]]:
    """Yield (name, data offset, size) of the regular files; read_at(offset, n) -> bytes.

    Every header field that positions the next header (size fields, pax ``size`` and record lengths) is
    checked, so each step moves forward; anything malformed is a TarFormatError naming the member."""
    pos, long_name, pax = 0, None, {}
    while pos + BLOCK <= total:
        h = read_at(pos, BLOCK)
        if h.count(0) == BLOCK:
            return
        try:
            checksum_ok = pos > 0 or _num(h[148:156]) == sum(h[:148]) + 256 + sum(h[156:])  # is it a tar at all
        except ValueError:
            checksum_ok = False
        if not checksum_ok:
            raise TarFormatError(f"{where}: not a tar header at byte {pos}")
        kind = h[156:157]
        name = h[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if h[257:262] == b"ustar" and h[345] != 0:
            name = h[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        name = pax.get("path", long_name or name)
        member = f"{where}: member {name!r} at byte {pos}"
        try:
            size = int(pax["size"]) if "size" in pax else _num(h[124:136])
        except ValueError as e:
            raise TarFormatError(f"{member}: bad size field ({e})") from None
        data = pos + BLOCK
        if data + size > total:
            raise TarFormatError(f"{member}: truncated ({size} bytes of data claimed, {total - data} left)")
        if kind in (b"L", b"x") and size > MAX_EXTENDED:
            raise TarFormatError(f"{member}: extended header of {size} bytes (at most {MAX_EXTENDED})")
        if kind == b"L":
            long_name = read_at(data, size).rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":
            pax = _pax(read_at(data, size), member)
        elif kind in (b"0", b"\0", b"7"):
            yield name, data, size
        if kind not in (b"L", b"x"):
            long_name, pax = None, {}
        pos = data + (size + BLOCK - 1) // BLOCK * BLOCK


def iter_members(buf: bytes, where: str = "tar") -> Iterator[tuple[str, int, int]]:
    """(name, offset, size) of each regular file in an in-memory tar."""
    return _parse(lambda off, n: buf[off : off + n], len(buf), where)


@contextmanager
def mapped_tar(path: str | os.PathLike) -> Iterator[bytes | mmap.mmap]:
    """A plain tar on disk, mapped read-only for ``iter_members`` (``b""`` when empty); compressed tars are refused."""
    if str(path).endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")):
        raise TarFormatError(f"{path}: compressed tars are not supported; use plain .tar shards")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            yield mm


def _template() -> bytearray:
    h = bytearray(BLOCK)
    h[100:108] = b"0000644\0"  # mode
    h[108:116] = b"0000000\0"  # uid
    h[116:124] = b"0000000\0"  # gid
    h[136:148] = b"00000000000\0"  # mtime 0
    h[148:156] = b"        "  # checksum counts as spaces
    h[156:157] = b"0"  # regular file
    h[257:265] = b"ustar\x0000"
    return h


_TEMPLATE = _template()
_TEMPLATE_SUM = sum(_TEMPLATE)


def _header(name: str, size: int) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > 100:  # long names: let tarfile write a pax header
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        return info.tobuf(format=tarfile.PAX_FORMAT)
    size_field = b"%011o\0" % size
    h = bytearray(_TEMPLATE)
    h[0 : len(raw)] = raw
    h[124:136] = size_field
    h[148:156] = b"%06o\0 " % (_TEMPLATE_SUM + sum(raw) + sum(size_field))
    return bytes(h)


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A complete tar archive holding ``members`` (name, payload) in order."""
    parts = []
    for name, payload in members:
        parts.append(_header(name, len(payload)))
        parts.append(payload)
        pad = -len(payload) % BLOCK
        if pad:
            parts.append(b"\0" * pad)
    parts.append(b"\0" * (2 * BLOCK))
    return b"".join(parts)
