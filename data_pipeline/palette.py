"""Colour palettes: iGPT's k-means palette (k=512) and a fixed 9-bit uniform palette.

A palette is a (K, 3) uint8 array of RGB centres saved as ``palette.npy``; its identity is the
sha256 of the file bytes. Token i means "the colour palette[i]".
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from igpt.data_pipeline.io import atomic_path, file_sha256
from igpt.data_pipeline.progress import bar
from igpt.errors import UserError

PALETTE_FILE = "palette.npy"


def uniform9_palette() -> np.ndarray:
    """512 colours, 3 bits per channel: levels round(i * 255 / 7), index = r * 64 + g * 8 + b."""
    levels = np.round(np.arange(8) * 255.0 / 7.0).astype(np.uint8)
    r, g, b = np.meshgrid(levels, levels, levels, indexing="ij")
    return np.stack([r.ravel(), g.ravel(), b.ravel()], axis=1)


def _check_palette(palette: np.ndarray) -> np.ndarray:
    palette = np.asarray(palette)
    if palette.ndim != 2 or palette.shape[1] != 3 or palette.dtype != np.uint8:
        raise UserError(f"a palette is a (K, 3) uint8 array, got {palette.dtype} {palette.shape}")
    if not 1 <= palette.shape[0] <= 65536:
        raise UserError(f"a palette has 1..65536 colours (uint16 tokens), got {palette.shape[0]}")
    return np.ascontiguousarray(palette)


def save_palette(palette: np.ndarray, path: str | os.PathLike) -> str:
    """Write ``palette`` as .npy (temp name, then rename); return the sha256 of the file bytes."""
    palette = _check_palette(palette)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, palette, allow_pickle=False)
    return file_sha256(path)


def load_palette(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """Read a palette file; return (palette (K, 3) uint8, sha256 of the file bytes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"palette file not found: {path}")
    try:
        palette = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise UserError(f"{path} is not a valid palette .npy file: {e}") from e
    return _check_palette(palette), file_sha256(path)


def _nearest(x: torch.Tensor, centres: torch.Tensor, chunk: int = 1 << 14) -> torch.Tensor:
    """Index of the nearest centre for each row of x (float), chunked to bound memory.

    One matmul per chunk: [x, 1] @ [-2c, |c|^2]^T is |x - c|^2 - |x|^2, whose argmin is the nearest centre.
    """
    c_aug = torch.cat([-2.0 * centres, (centres * centres).sum(1, keepdim=True)], 1).T.contiguous()
    x_aug = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], chunk):
        out[s : s + chunk] = (x_aug[s : s + chunk] @ c_aug).argmin(1)
    return out


def _kmeans_pp(pts: torch.Tensor, w: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    """k-means++ seeding on weighted points (a colour drawn with probability count * D^2)."""
    n = pts.shape[0]
    wf = w.double()
    first = rng.choice(n, p=(wf / wf.sum()).cpu().numpy())
    chosen = [first]
    d2 = ((pts - pts[first]) ** 2).sum(1).double()
    for _ in range(1, min(k, n)):
        p = (d2 * wf).cpu().numpy()
        if p.sum() <= 0:
            break
        nxt = rng.choice(n, p=p / p.sum())
        chosen.append(nxt)
        d2 = torch.minimum(d2, ((pts - pts[nxt]) ** 2).sum(1).double())
    # Fewer distinct colours than k: repeat some (ties resolve to the lowest index anyway).
    return pts[torch.from_numpy(np.resize(np.array(chosen), k)).to(pts.device)].clone()


def fit_kmeans_palette(
    pixels: np.ndarray,
    k: int = 512,
    seed: int = 0,
    iters: int = 30,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """k-means (Lloyd) on RGB pixels, as iGPT; returns (k, 3) uint8 centres sorted by luminance.

    Runs on ``device`` (default: CUDA when available). Identical pixels are merged into
    weighted points first, cluster sums are exact int64, so the result is reproducible for a
    seed on a given device. A cluster that loses all its points is re-seeded at the point that
    is farthest from its current centre (weighted by count), so all k centres stay in use
    while there are at least k distinct colours.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.shape[1] != 3 or pixels.dtype != np.uint8:
        raise UserError(f"pixels must be (N, 3) uint8, got {pixels.dtype} {pixels.shape}")
    if pixels.shape[0] == 0:
        raise UserError("no pixels to fit a palette on")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    codes = (pixels[:, 0].astype(np.int64) << 16) | (pixels[:, 1].astype(np.int64) << 8) | pixels[:, 2]
    uniq, counts = np.unique(codes, return_counts=True)
    pts_np = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], axis=1)
    pts_i = torch.from_numpy(pts_np).to(device)  # int64, exact sums
    pts = pts_i.float()
    w = torch.from_numpy(counts).to(device)
    n = pts.shape[0]

    centres = _kmeans_pp(pts, w, k, np.random.default_rng(seed))
    assign = None
    with bar(total=iters, desc=f"palette: k-means k={k}", unit="iter") as progress:
        for _ in range(iters):
            new_assign = _nearest(pts, centres)
            sums = torch.zeros(k, 3, dtype=torch.long, device=device).index_add_(0, new_assign, pts_i * w[:, None])
            sizes = torch.zeros(k, dtype=torch.long, device=device).index_add_(0, new_assign, w)
            live = sizes > 0
            means = sums.double() / sizes.clamp(min=1)[:, None].double()
            centres = torch.where(live[:, None], means, centres.double()).float()
            dead = (~live).nonzero().flatten()
            if dead.numel() and n > k:
                err = ((pts - centres[new_assign]) ** 2).sum(1) * w.float()
                far = torch.argsort(err, descending=True, stable=True)[: dead.numel()]
                centres[dead] = pts[far]
            elif assign is not None and torch.equal(new_assign, assign):
                break
            assign = new_assign
            progress.update()
    out = centres.round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    lum = out.astype(np.int64) @ np.array([299, 587, 114])
    return out[np.argsort(lum, kind="stable")]
