"""``train.init_from``: the weights a fresh run starts from (a release or another run's newest checkpoint).

Only the weights come along: the optimizer, the schedule and the step count start afresh. The source must
fit the run exactly: the same palette (``check_palette``), the same parameter names and shapes, and the same
architecture fields (sizes, objective, norm, the heads and activation, and a patch model's unit, patch size,
target and order, which no shape tells).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from igpt.data_pipeline.token_shards import check_palette
from igpt.errors import UserError
from igpt.pretrain.model import IGPTConfig
from igpt.pretrain.models import build_model
from igpt.pretrain.release import load_model

ARCHITECTURE_FIELDS = ("vocab_size", "n_ctx", "n_layer", "n_embd", "n_head", "objective", "norm", "activation",
                       "unit", "patch_size", "target", "order")


class InitMismatch(UserError):
    """``train.init_from`` names weights that do not fit the run's model or data."""


def load_init_state(source: str | os.PathLike, model_cfg: IGPTConfig, palette_sha256: str,
                    trust: bool = False) -> dict[str, Tensor]:
    """The fp32 state dict of ``source`` for a model ``model_cfg`` on data with palette ``palette_sha256``
    (``trust``: as ``load_model``'s); raise ``InitMismatch`` naming every parameter or field that differs."""
    model, cfg, sha = load_model(source, trust)
    check_palette(sha, palette_sha256, f"train.init_from={source} against the training data", error=InitMismatch)
    state = model.state_dict()
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in build_model(model_cfg).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"model.{f}: {getattr(cfg.model, f)!r} in the source, {getattr(model_cfg, f)!r} in this run"
                for f in ARCHITECTURE_FIELDS if getattr(cfg.model, f) != getattr(model_cfg, f)]
    shapes = [f"{k} {have.get(k, 'missing')} against {wanted.get(k, 'absent')}"
              for k in sorted(set(wanted) | set(have)) if have.get(k) != wanted.get(k)]
    if shapes:
        more = f" and {len(shapes) - 3} more" if len(shapes) > 3 else ""
        problems.append(f"{len(shapes)} parameters differ ({', '.join(shapes[:3])}{more})")
    if problems:
        raise InitMismatch(f"train.init_from={source} does not fit this run's model: {'; '.join(problems)}")
    return state
