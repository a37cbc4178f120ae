"""Sampling with the KV cache: unconditional images and bottom-half completions (tiled by igpt.data_pipeline.grid)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from igpt.data_pipeline.progress import bar
from igpt.data_pipeline.quantize import dequantize
from igpt.pretrain.models import Model


def sample_unconditional(
    model: Model, n: int, resolution: int, *, temperature: float = 1.0, top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(n, R*R) token images sampled from scratch."""
    with _position_progress(model, resolution * resolution, "sample: unconditional"):
        return model.generate(n, n_tokens=resolution * resolution, temperature=temperature, top_k=top_k,
                              generator=generator)


def complete_bottom_half(
    model: Model, tokens: torch.Tensor, resolution: int, per_image: int = 1, *, temperature: float = 1.0,
    top_k: int | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, per_image, R*R): the top R//2 rows of each image kept, the rest sampled."""
    keep = (resolution // 2) * resolution
    prefix = tokens[:, :keep].repeat_interleave(per_image, dim=0)
    with _position_progress(model, resolution * resolution - keep, "sample: bottom halves"):
        out = model.generate(prefix=prefix, n_tokens=resolution * resolution, temperature=temperature,
                             top_k=top_k, generator=generator)
    return out.view(tokens.shape[0], per_image, -1)


@contextmanager
def _position_progress(model: Model, pixels: int, desc: str) -> Iterator[None]:
    """A progress bar over the positions ``generate`` samples: it runs the output head once per position (a pixel,
    or a patch)."""
    per_position = model.cfg.patch_size ** 2 if model.cfg.unit == "patch" else 1
    with bar(total=-(-pixels // per_position), desc=desc, unit="px" if per_position == 1 else "patch") as b:
        hook = model.head.register_forward_hook(lambda *_: b.update())
        try:
            yield
        finally:
            hook.remove()


def to_rgb(tokens: torch.Tensor | np.ndarray, palette: np.ndarray, resolution: int) -> np.ndarray:
    """Token images (..., R*R) → uint8 RGB (..., R, R, 3)."""
    t = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    return dequantize(t, palette).reshape(*t.shape[:-1], resolution, resolution, 3)


def occlude_bottom(rgb: np.ndarray, fill: int = 128) -> np.ndarray:
    """The image with its bottom half (the part to complete) greyed out."""
    out = rgb.copy()
    out[..., rgb.shape[-3] // 2 :, :, :] = fill
    return out


def completion_rows(originals: np.ndarray, completions: np.ndarray) -> list[list[np.ndarray]]:
    """One row per image: occluded input, its completions, then the original."""
    return [[occlude_bottom(o), *c, o] for o, c in zip(originals, completions)]
