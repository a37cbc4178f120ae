"""Tiling uint8 RGB images into one grid, and writing it as a PNG (the data, training and eval stages' pictures)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from igpt.data_pipeline.io import atomic_path
from igpt.errors import UserError


def image_grid(rows: list[list[np.ndarray]], scale: int = 1, pad: int = 2, background: int = 255) -> np.ndarray:
    """Tile equal-size (R, R, 3) images, upscaled by ``scale`` (nearest), with ``pad`` pixels between cells.

    Size: (rows·R·scale + (rows+1)·pad, cols·R·scale + (cols+1)·pad, 3), cols = the longest row."""
    if not rows or not rows[0]:
        raise UserError("image_grid needs at least one image")
    h, w = rows[0][0].shape[:2]
    ch, cw = h * scale, w * scale
    ncols = max(len(r) for r in rows)
    grid = np.full((len(rows) * ch + (len(rows) + 1) * pad, ncols * cw + (ncols + 1) * pad, 3), background, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (ch + pad), pad + j * (cw + pad)
            grid[y : y + ch, x : x + cw] = img.repeat(scale, 0).repeat(scale, 1)
    return grid


def chunk_rows(images: np.ndarray, ncols: int) -> list[list[np.ndarray]]:
    """Lay a flat list of images out in rows of ``ncols``."""
    return [list(images[i : i + ncols]) for i in range(0, len(images), ncols)]


def save_png(array: np.ndarray, path: str | Path) -> str:
    """Write an RGB array as PNG via a temporary name."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return str(path)
