"""Model size presets: the paper's iGPT-S/M/L/XL and small models for CPU runs and tests.

Parameter counts at context 1024 and vocabulary 512 (``IGPT(model_config(name)).num_params()``):
igpt-s 76.71M, igpt-m 455.56M, igpt-l 1363.06M, igpt-xl 6803.47M (paper: 76M / 455M / 1.4B / 6.8B).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from igpt.errors import UserError
from igpt.pretrain.model import IGPTConfig

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Chen et al. 2020, Table 1 / Appendix: layers, width, heads (head dims 64 / 128 / 96 / 128).
    "igpt-s": {"n_layer": 24, "n_embd": 512, "n_head": 8},
    "igpt-m": {"n_layer": 36, "n_embd": 1024, "n_head": 8},
    "igpt-l": {"n_layer": 48, "n_embd": 1536, "n_head": 16},
    "igpt-xl": {"n_layer": 60, "n_embd": 3072, "n_head": 24},
    # CPU-sized models for tests, smoke runs and the small examples.
    "igpt-tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4},
    "igpt-mini": {"n_layer": 4, "n_embd": 128, "n_head": 4},
}


def model_config(preset: str, **overrides: Any) -> IGPTConfig:
    """The IGPTConfig of ``preset`` with ``overrides`` (any IGPTConfig field) applied last."""
    if preset not in MODEL_PRESETS:
        raise UserError(f"unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(IGPTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown IGPTConfig field(s) {unknown}; valid fields: {sorted(fields)}")
    return IGPTConfig(**{**MODEL_PRESETS[preset], **overrides})
