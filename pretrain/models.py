"""The model a config names: pixel iGPT (``igpt.pretrain.model.IGPT``) or the patch model
(``igpt.pretrain.patch_model.PatchGPT``), by ``IGPTConfig.unit``."""
from __future__ import annotations

from typing import Union

import numpy as np

from igpt.pretrain.model import IGPT, IGPTConfig
from igpt.pretrain.patch_model import PatchGPT

Model = Union[IGPT, PatchGPT]


def build_model(cfg: IGPTConfig, palette: np.ndarray | None = None) -> Model:
    """The model of ``cfg``; a patch model carries ``palette`` (the token shards' (K, 3) uint8 colours) when given."""
    if cfg.unit == "pixel":
        return IGPT(cfg)
    model = PatchGPT(cfg)
    if palette is not None:
        model.set_palette(palette)
    return model
