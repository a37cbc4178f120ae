"""Load a trained iGPT without DeepSpeed: from a release dir or from a training run dir.

A release dir (``igpt export``) is read with safetensors only, so no pickled code can run. A run
dir is consolidated from its newest complete checkpoint (``igpt.pretrain.checkpoint.consolidated_state_dict``:
weights-only unpickling, or DeepSpeed's file utilities for a checkpoint the user owns or trusts, without an
engine or process group). Either's ``config.yaml`` is someone else's: an interpolation in it is refused.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from igpt.data_pipeline.io import atomic_dir, file_sha256
from igpt.data_pipeline.palette import PALETTE_FILE
from igpt.data_pipeline.token_shards import check_palette
from igpt.pretrain import checkpoint as ckpt
from igpt.pretrain.config import TrainConfig, load_config, save_config
from igpt.pretrain.models import Model, build_model

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.yaml"


def write_release(out: str | os.PathLike, state: dict[str, torch.Tensor], cfg: TrainConfig, palette: Path,
                  metadata: dict[str, str]) -> Path:
    """Write the release dir ``out`` (must not exist or be empty): weights with ``metadata`` (the palette
    sha256 among it), the config and the palette, all or nothing."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    with atomic_dir(out) as tmp:
        save_file(state, tmp / WEIGHTS_FILE, metadata=metadata)
        save_config(cfg, tmp / CONFIG_FILE)
        shutil.copyfile(palette, tmp / PALETTE_FILE)
    return out


def palette_file(path: str | os.PathLike, data_dir: str, sha: str | None) -> Path:
    """The palette of the release dir ``path`` (its own copy) or of a run dir (its data's, in ``data_dir``),
    checked against the weights' palette ``sha``."""
    path = Path(path)
    release = (path / WEIGHTS_FILE).is_file()
    palette = path / PALETTE_FILE if release else Path(data_dir) / PALETTE_FILE
    if not palette.is_file():
        raise FileNotFoundError(f"{palette} is missing: " + ("a release carries its palette" if release else
                                                             "the palette of the run's data"))
    check_palette(sha, file_sha256(palette), f"{palette} against the weights' palette")
    return palette


def load_model(path: str | os.PathLike, trust: bool = False) -> tuple[Model, TrainConfig, str]:
    """(model in eval mode on CPU, resolved training config, palette sha256) from a release or run dir
    (``trust``: load a run dir's checkpoint that is not the user's own, ``--trust-checkpoint``)."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        cfg = load_config(path / CONFIG_FILE, plain=True)
        state = load_file(path / WEIGHTS_FILE)
        with safe_open(path / WEIGHTS_FILE, framework="pt") as f:
            sha = (f.metadata() or {}).get("palette_sha256")
        palette_file(path, cfg.data.dir, sha)
    elif (path / "checkpoints").is_dir():
        tag_dir = ckpt.resolve_tag(path)
        cfg = load_config(path / CONFIG_FILE, plain=True)
        state = ckpt.consolidated_state_dict(tag_dir, trust)
        sha = ckpt.verify(tag_dir, check_sha256=False)["palette_sha256"]
    else:
        raise FileNotFoundError(f"{path} is neither a release dir (model.safetensors) nor a run dir (checkpoints/)")
    if cfg.model.n_ctx is None:  # a config that left the data-given sizes unset: the weights know them
        cfg.model.n_ctx = state["wpe.weight"].shape[0]
    if cfg.model.vocab_size is None:  # the pixel model's token embedding, the patch model's palette
        cfg.model.vocab_size = state["wte.weight" if cfg.model.unit == "pixel" else "palette"].shape[0]
    model = build_model(cfg.model)  # a patch model's palette is among the weights
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg, sha
