"""Fitting a palette to data: sample pixels from source images, then k-means (``igpt palette fit``)."""
from __future__ import annotations

import numpy as np

from igpt.data_pipeline.palette import fit_kmeans_palette
from igpt.data_pipeline.progress import bar
from igpt.data_pipeline.sources import decoded_images, find_images
from igpt.errors import UserError


def sample_pixels(
    sources: list[str], resolution: int, max_images: int = 10000, pixels_per_image: int = 64, seed: int = 0
) -> np.ndarray:
    """(N, 3) uint8 pixels: ``pixels_per_image`` random pixels of up to ``max_images`` random images,
    each resized and centre-cropped to ``resolution`` as the shards will be. Undecodable inputs are skipped."""
    items = find_images(sources).items
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(items))[:max_images]
    out = []
    picked = bar([items[i] for i in sorted(chosen)], desc="palette: sample pixels", unit="img")
    for image in decoded_images(picked, resolution):
        rgb = image.reshape(-1, 3)
        out.append(rgb[rng.choice(len(rgb), size=min(pixels_per_image, len(rgb)), replace=False)])
    if not out:
        raise UserError(f"no decodable images in {sources} to fit a palette on")
    return np.concatenate(out)


def fit_palette_from_sources(
    sources: list[str], *, resolution: int = 32, k: int = 512, max_images: int = 10000, pixels_per_image: int = 64,
    seed: int = 0, iters: int = 30, device: str | None = None,
) -> np.ndarray:
    """iGPT's palette: k-means with ``k`` centres on pixels sampled from ``sources``."""
    pixels = sample_pixels(sources, resolution, max_images, pixels_per_image, seed)
    return fit_kmeans_palette(pixels, k=k, seed=seed, iters=iters, device=device)
