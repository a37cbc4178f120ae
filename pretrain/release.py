"""Load a trained iGPT without DeepSpeed: from a release dir or from a training run dir.

A release dir (``igpt export``) is read with safetensors only, so no pickled code can run. A run
dir is consolidated from its newest complete checkpoint (our own files, read with DeepSpeed's
file utilities, without an engine or process group).
"""
from __future__ import annotations

import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from pretrain.config import TrainConfig, load_config
from pretrain.model import IGPT


def load_model(path: str | os.PathLike) -> tuple[IGPT, TrainConfig, str]:
    """(model in eval mode on CPU, resolved training config, palette sha256) from a release or run dir."""
    from data_pipeline.io import file_sha256

    path = Path(path)
    if (path / "model.safetensors").is_file():
        cfg = load_config(path / "config.yaml")
        state = load_file(path / "model.safetensors")
        with safe_open(path / "model.safetensors", framework="pt") as f:
            sha = (f.metadata() or {}).get("palette_sha256")
        if not (path / "palette.npy").is_file() or file_sha256(path / "palette.npy") != sha:
            raise ValueError(f"{path / 'palette.npy'} is missing or does not match the weights' palette {sha}")
    elif (path / "checkpoints").is_dir():
        from pretrain import checkpoint as ckpt
        from pretrain.export import consolidated_state_dict, resolve_tag

        tag_dir = resolve_tag(path)
        cfg = load_config(path / "config.yaml")
        state = consolidated_state_dict(tag_dir)
        sha = ckpt.verify(tag_dir, check_sha256=False)["palette_sha256"]
    else:
        raise FileNotFoundError(f"{path} is neither a release dir (model.safetensors) nor a run dir (checkpoints/)")
    if cfg.model.n_ctx is None:  # a config that left the data-given sizes unset: the weights know them
        cfg.model.n_ctx = state["wpe.weight"].shape[0]
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = state["wte.weight"].shape[0]
    model = IGPT(cfg.model)
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg, sha
