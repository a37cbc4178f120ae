"""Exact nearest-palette quantisation of uint8 RGB through a 2^24-entry lookup table.

The table maps every 24-bit colour to the index of its nearest palette centre (squared
Euclidean distance, lowest index on ties), so quantising is one gather per pixel and is
bit-exact with brute force by construction. Building it prunes candidates per 16^3 colour
block (a centre can only win inside a block if its distance lower bound there is no larger
than the smallest upper bound of any centre) and scores the survivors with exact integer
arithmetic carried in float32 (every value is an integer below 2^24). The table is cached
beside the palette file as ``<stem>.<sha256[:16]>.lut.npy``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from igpt.data_pipeline.io import atomic_path
from igpt.data_pipeline.palette import _check_palette, load_palette
from igpt.data_pipeline.progress import bar
from igpt.errors import UserError

_MIN_BLOCK = 4  # smallest colour-cube block that candidate pruning subdivides to
_MAX_CAND = 16  # a block with more surviving candidates than this is split into 8
_MAX_BLOCK = 16  # blocks larger than this are always split (bounds the scoring memory)
_LUT_SIZE = 1 << 24


def rgb_codes(rgb: np.ndarray) -> np.ndarray:
    """Pack (..., 3) uint8 RGB into flat uint32 lookup codes r | g << 8 | b << 16."""
    flat = rgb.reshape(-1, 3)
    codes = flat[:, 2].astype(np.uint32)
    codes <<= 8
    codes |= flat[:, 1]
    codes <<= 8
    codes |= flat[:, 0]
    return codes


def _bounds(lo: np.ndarray, size: int, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min and max squared distance from each centre c (m, 3) to the cube [lo, lo + size)."""
    hi = lo + size - 1
    dmin = (np.maximum(lo - c, 0) + np.maximum(c - hi, 0)) ** 2
    dmax = np.maximum((c - lo) ** 2, (hi - c) ** 2)
    return dmin.sum(1), dmax.sum(1)


def build_lut(palette: np.ndarray, progress: bool = True) -> np.ndarray:
    """The (2^24,) uint16 table of nearest centres, indexed by ``rgb_codes``.

    Recursively splits the colour cube into octants, keeping for each the centres whose lower
    distance bound does not exceed the best upper bound (ties kept, so the lowest index still
    wins), and scores small blocks exhaustively: exact, and about 1 s for typical palettes (longer for
    clustered ones: ``progress`` allows a bar over the colours filled in).
    """
    palette = _check_palette(palette)
    # A repeated colour never wins over its first occurrence: score distinct colours only.
    _, first = np.unique(rgb_codes(palette), return_index=True)
    index = np.sort(first).astype(np.uint16)
    c = palette[index].astype(np.int64)
    cf = c.astype(np.float32)
    c2f = (c * c).sum(1).astype(np.float32)
    lut = np.empty((256, 256, 256), dtype=np.uint16)  # [b, g, r]
    grids: dict[int, np.ndarray] = {}
    stack = [(np.zeros(3, dtype=np.int64), 256, np.arange(len(c)))]
    with bar(total=_LUT_SIZE, desc="colour lookup table", unit="colour", unit_scale=True, show=progress) as b:
        while stack:
            lo, size, cand = stack.pop()
            dmin, dmax = _bounds(lo, size, c[cand])
            cand = cand[dmin <= dmax.min()]
            if size > _MAX_BLOCK or (len(cand) > _MAX_CAND and size > _MIN_BLOCK):
                half = size // 2
                for corner in np.ndindex(2, 2, 2):
                    stack.append((lo + half * np.array(corner), half, cand))
                continue
            if size not in grids:
                off = np.arange(size)
                ob, og, orr = np.meshgrid(off, off, off, indexing="ij")
                grids[size] = np.stack([orr.ravel(), og.ravel(), ob.ravel()], 1).astype(np.float32)
            x = grids[size] + lo.astype(np.float32)
            best = index[cand[(c2f[cand][None, :] - 2.0 * (x @ cf[cand].T)).argmin(1)]]
            lut[lo[2] : lo[2] + size, lo[1] : lo[1] + size, lo[0] : lo[0] + size] = best.reshape(size, size, size)
            b.update(size**3)
    return lut.reshape(-1)


def quantize_bruteforce(rgb: np.ndarray, palette: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Reference: nearest centre by exact int64 squared distance, lowest index on ties."""
    palette = _check_palette(palette).astype(np.int64)
    flat = np.asarray(rgb, dtype=np.int64).reshape(-1, 3)
    out = np.empty(flat.shape[0], dtype=np.uint16)
    for s in range(0, flat.shape[0], chunk):
        d = ((flat[s : s + chunk, None, :] - palette[None]) ** 2).sum(-1)
        out[s : s + chunk] = d.argmin(1)
    return out.reshape(np.shape(rgb)[:-1])


def lut_cache_path(palette_path: str | os.PathLike, sha256: str) -> Path:
    """Where the lookup table for the palette file is cached."""
    p = Path(palette_path)
    return p.with_name(f"{p.stem}.{sha256[:16]}.lut.npy")


def _load_or_build_lut(palette: np.ndarray, cache: Path | None, progress: bool = True) -> np.ndarray:
    if cache is not None and cache.is_file():
        try:
            lut = np.load(cache, mmap_mode="r", allow_pickle=False)
            if lut.shape == (_LUT_SIZE,) and lut.dtype == np.uint16:
                return lut
        except (ValueError, OSError):
            pass  # unreadable cache: rebuild below
    lut = build_lut(palette, progress)
    if cache is not None:
        try:
            with atomic_path(cache) as tmp, open(tmp, "wb") as f:
                np.save(f, lut, allow_pickle=False)
        except OSError:  # read-only location: keep the in-memory table
            pass
    return lut


class Quantizer:
    """Maps uint8 RGB (..., 3) to uint16 palette indices (...), bit-exact with brute force."""

    def __init__(self, palette: np.ndarray, cache_path: str | os.PathLike | None = None, progress: bool = True):
        self.palette = _check_palette(palette)
        self.lut = _load_or_build_lut(self.palette, Path(cache_path) if cache_path else None, progress)

    @classmethod
    def from_file(cls, palette_path: str | os.PathLike, progress: bool = True) -> "Quantizer":
        """Load a palette file and its cached lookup table (built and cached on first use)."""
        palette, sha = load_palette(palette_path)
        return cls(palette, lut_cache_path(palette_path, sha), progress)

    def quantize(self, rgb: np.ndarray) -> np.ndarray:
        """Nearest palette index for every pixel of a (..., 3) uint8 array."""
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim < 1 or rgb.shape[-1] != 3:
            raise UserError(f"quantize expects (..., 3) uint8 RGB, got {rgb.dtype} {rgb.shape}")
        return self.lut[rgb_codes(rgb)].reshape(rgb.shape[:-1])


def dequantize(tokens: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Palette colours (..., 3) uint8 for integer tokens (...)."""
    palette = _check_palette(palette)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= palette.shape[0]):
        raise UserError(f"tokens outside [0, {palette.shape[0]}) for this palette")
    return palette[tokens.astype(np.intp)]
