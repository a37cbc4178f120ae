"""Sampling with the KV cache: unconditional images and bottom-half completions, written as PNG grids."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.quantize import dequantize
from pretrain.model import IGPT


def sample_unconditional(
    model: IGPT, n: int, resolution: int, *, temperature: float = 1.0, top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(n, R*R) token images sampled from scratch."""
    return model.generate(n, n_tokens=resolution * resolution, temperature=temperature, top_k=top_k,
                          generator=generator)


def complete_bottom_half(
    model: IGPT, tokens: torch.Tensor, resolution: int, per_image: int = 1, *, temperature: float = 1.0,
    top_k: int | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, per_image, R*R): the top R//2 rows of each image kept, the rest sampled."""
    keep = (resolution // 2) * resolution
    prefix = tokens[:, :keep].repeat_interleave(per_image, dim=0)
    out = model.generate(prefix=prefix, n_tokens=resolution * resolution, temperature=temperature,
                         top_k=top_k, generator=generator)
    return out.view(tokens.shape[0], per_image, -1)


def to_rgb(tokens: torch.Tensor | np.ndarray, palette: np.ndarray, resolution: int) -> np.ndarray:
    """Token images (..., R*R) → uint8 RGB (..., R, R, 3)."""
    t = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    return dequantize(t, palette).reshape(*t.shape[:-1], resolution, resolution, 3)


def occlude_bottom(rgb: np.ndarray, fill: int = 128) -> np.ndarray:
    """The image with its bottom half (the part to complete) greyed out."""
    out = rgb.copy()
    out[..., rgb.shape[-3] // 2 :, :, :] = fill
    return out


def image_grid(rows: list[list[np.ndarray]], scale: int = 1, pad: int = 2, background: int = 255) -> np.ndarray:
    """Tile equal-size (R, R, 3) images, upscaled by ``scale`` (nearest), with ``pad`` pixels between cells.

    Size: (rows·R·scale + (rows+1)·pad, cols·R·scale + (cols+1)·pad, 3), cols = the longest row."""
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one image")
    h, w = rows[0][0].shape[:2]
    ch, cw = h * scale, w * scale
    ncols = max(len(r) for r in rows)
    grid = np.full((len(rows) * ch + (len(rows) + 1) * pad, ncols * cw + (ncols + 1) * pad, 3), background, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (ch + pad), pad + j * (cw + pad)
            grid[y : y + ch, x : x + cw] = img.repeat(scale, 0).repeat(scale, 1)
    return grid


def save_png(array: np.ndarray, path: str | Path) -> str:
    """Write an RGB array as PNG via a temporary name."""
    path = str(path)
    tmp = f"{path}.tmp{os.getpid()}"
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def completion_rows(originals: np.ndarray, completions: np.ndarray) -> list[list[np.ndarray]]:
    """One row per image: occluded input, its completions, then the original."""
    return [[occlude_bottom(o), *c, o] for o, c in zip(originals, completions)]


def chunk_rows(images: np.ndarray, ncols: int) -> list[list[np.ndarray]]:
    """Lay a flat list of images out in rows of ``ncols``."""
    return [list(images[i : i + ncols]) for i in range(0, len(images), ncols)]
