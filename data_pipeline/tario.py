"""Minimal, fast tar reading and writing for WebDataset shards (plain, uncompressed tars).

Reading walks the 512-byte headers directly (ustar, GNU long names and pax ``path``/``size``
records are understood), which is several times faster than ``tarfile`` for the many small
members of a shard. Writing produces deterministic ustar members (mtime 0, mode 0644).
"""
from __future__ import annotations

import mmap
import os
import tarfile
from collections.abc import Iterable, Iterator

from igpt.errors import UserError

BLOCK = 512


class TarFormatError(UserError):
    """A file that is not a readable plain tar archive."""


def _num(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    field = field.strip(b" \0")
    return int(field, 8) if field else 0


def _pax(payload: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(payload):
        space = payload.index(b" ", pos)
        length = int(payload[pos:space])
        key, _, value = payload[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _parse(read_at, total: int, where: str) -> Iterator[tuple[str, int, int]]:
    """Yield (name, data offset, size) of the regular files; read_at(offset, n) -> bytes."""
    pos, long_name, pax = 0, None, {}
    while pos + BLOCK <= total:
        h = read_at(pos, BLOCK)
        if h.count(0) == BLOCK:
            return
        try:
            size = _num(h[124:136])
            checksum_ok = pos > 0 or _num(h[148:156]) == sum(h[:148]) + 256 + sum(h[156:])  # is it a tar at all
        except ValueError:
            checksum_ok = False
        if not checksum_ok:
            raise TarFormatError(f"{where}: not a tar header at byte {pos}")
        kind = h[156:157]
        data = pos + BLOCK
        if "size" in pax:
            size = int(pax["size"])
        if data + size > total:
            raise TarFormatError(f"{where}: truncated tar member at byte {pos}")
        if kind == b"L":
            long_name = read_at(data, size).rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":
            pax = _pax(read_at(data, size))
        elif kind in (b"0", b"\0", b"7"):
            name = h[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if h[257:262] == b"ustar" and h[345] != 0:
                name = h[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            name = pax.get("path", long_name or name)
            yield name, data, size
        if kind not in (b"L", b"x"):
            long_name, pax = None, {}
        pos = data + (size + BLOCK - 1) // BLOCK * BLOCK


def iter_members(buf: bytes, where: str = "tar") -> Iterator[tuple[str, int, int]]:
    """(name, offset, size) of each regular file in an in-memory tar."""
    return _parse(lambda off, n: buf[off : off + n], len(buf), where)


def index_tar_file(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(name, offset, size) of each regular file in a tar on disk, reading only the headers."""
    if str(path).endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")):
        raise TarFormatError(f"{path}: compressed tars are not supported; use plain .tar shards")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return list(_parse(lambda off, n: mm[off : off + n], len(mm), str(path)))


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
