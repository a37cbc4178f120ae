"""``igpt export RUN_DIR [--tag T] --out DIR``: a DeepSpeed checkpoint → a release dir.

The release dir holds ``model.safetensors`` (consolidated fp32 weights of the bare ``IGPT``,
with the palette sha256, step and source checkpoint as safetensors metadata), ``config.yaml``
(the resolved training config) and ``palette.npy``. It needs neither DeepSpeed nor the world
size that trained it; ``igpt.pretrain.release.load_model`` reads it.
ZeRO-1/2/3 checkpoints are consolidated with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
(from the fp32 master partitions of every rank); ZeRO-0 checkpoints hold the full module already.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from igpt.data_pipeline.progress import bar
from igpt.pretrain import checkpoint as ckpt
from igpt.pretrain.config import load_config
from igpt.pretrain.release import CONFIG_FILE, palette_file, write_release

MODULE_PREFIX = "model."  # the training engine wraps IGPT in LossModule


def resolve_tag(run_dir: str | os.PathLike, tag: str | None = None) -> Path:
    """The checkpoint dir to read: ``tag`` (verified) or the newest complete one."""
    if tag is not None:
        tag_dir = ckpt.checkpoints_dir(run_dir) / tag
        ckpt.verify(tag_dir)
        return tag_dir
    found = ckpt.find_resumable(run_dir)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt.checkpoints_dir(run_dir)}")
    return found[0]


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 ``IGPT`` state dict of a checkpoint of any ZeRO stage (loaded from our own trusted files)."""
    info = ckpt.verify(tag_dir, check_sha256=False)
    if info["zero_stage"] == 0:
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = states["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k.removeprefix(MODULE_PREFIX): v.detach().float().contiguous().clone() for k, v in sd.items()}


def export(run_dir: str | os.PathLike, out: str | os.PathLike, tag: str | None = None) -> Path:
    """Write the release dir ``out`` (must not exist yet) from a run's checkpoint; return its path."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run dir (no {CONFIG_FILE})")
    with bar(total=3, desc="export: verify checkpoint", unit="step") as steps:
        tag_dir = resolve_tag(run_dir, tag)
        info = ckpt.verify(tag_dir, check_sha256=False)
        cfg = load_config(run_dir / CONFIG_FILE)
        palette = palette_file(run_dir, cfg.data.dir, info["palette_sha256"])
        steps.set_description("export: consolidate weights")
        steps.update()
        state = consolidated_state_dict(tag_dir)
        steps.set_description("export: write release")
        steps.update()
        metadata = {"palette_sha256": info["palette_sha256"], "step": str(info["step"]), "source": str(tag_dir.resolve())}
        write_release(out, state, cfg, palette, metadata)
        steps.update()
    return out
