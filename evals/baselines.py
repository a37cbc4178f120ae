"""Probe baselines: raw pixels and a randomly initialised model of the same shape.

Raw pixels are the palette colours of the tokens (the shards' ``palette.npy``), flattened to
(N, R*R*3) and scaled to [0, 1]; the probe standardises them like model features. The random
model is ``build_model(cfg)`` built under a fixed seed (a patch model carrying the shards' palette); its features go through the ``FeatureCache``
under a checkpoint id prefixed ``random-init-``, so they never collide with trained weights.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from igpt.data_pipeline.quantize import dequantize
from igpt.evals.features import FeatureCache, checkpoint_identity
from igpt.evals.inputs import EvalData
from igpt.pretrain.model import IGPTConfig
from igpt.pretrain.models import Model, build_model

RAW_PIXELS = "raw_pixels"
RANDOM_INIT = "random_init"
PIXEL_LAYER = -1  # the "layer" of raw-pixel trials: the input, before the model


def pixel_features(
    data: EvalData, split: str, *, batch_size: int = 256, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Dequantised RGB of a labelled split: features (N, R*R*3) float32 in [0, 1] and labels (N,)."""
    palette = data.palette
    xs, ys = [], []
    for batch in data.batches(split, batch_size, labels=True, limit=limit):
        rgb = dequantize(batch["tokens"].numpy(), palette)
        xs.append(rgb.reshape(len(rgb), -1).astype(np.float32) / 255.0)
        ys.append(batch["labels"].numpy())
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def random_init_model(cfg: IGPTConfig, seed: int, palette: np.ndarray | None = None) -> Model:
    """``build_model(cfg, palette)`` initialised under ``seed``, leaving the global RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg, palette).eval()


def random_init_cache(root: str | Path, cfg: IGPTConfig, seed: int, palette: np.ndarray | None = None) -> FeatureCache:
    """A feature cache over the seeded random model, keyed apart from any trained checkpoint."""
    model = random_init_model(cfg, seed, palette)
    return FeatureCache(root, model, checkpoint_id=f"random-init-{checkpoint_identity(model)}")
