"""``igpt export RUN_DIR [--tag T] --out DIR``: a DeepSpeed checkpoint → a release dir.

The release dir holds ``model.safetensors`` (consolidated fp32 weights of the bare ``IGPT``,
with the palette sha256, step and source checkpoint as safetensors metadata), ``config.yaml``
(the resolved training config) and ``palette.npy``. It needs neither DeepSpeed nor the world
size that trained it; ``igpt.pretrain.release.load_model`` reads it. The weights of a checkpoint of any
ZeRO stage are consolidated by ``igpt.pretrain.checkpoint.consolidated_state_dict``.
"""
from __future__ import annotations

import os
from pathlib import Path

from igpt.data_pipeline.progress import bar
from igpt.pretrain import checkpoint as ckpt
from igpt.pretrain.config import load_config
from igpt.pretrain.release import CONFIG_FILE, palette_file, write_release


def export(run_dir: str | os.PathLike, out: str | os.PathLike, tag: str | None = None, trust: bool = False) -> Path:
    """Write the release dir ``out`` (must not exist yet) from a run's checkpoint (``trust``: one that is not
    the user's own, ``--trust-checkpoint``); return its path."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run dir (no {CONFIG_FILE})")
    with bar(total=3, desc="export: verify checkpoint", unit="step") as steps:
        tag_dir = ckpt.resolve_tag(run_dir, tag)
        info = ckpt.verify(tag_dir, check_sha256=False)
        cfg = load_config(run_dir / CONFIG_FILE, plain=True)
        palette = palette_file(run_dir, cfg.data.dir, info["palette_sha256"])
        steps.set_description("export: consolidate weights")
        steps.update()
        state = ckpt.consolidated_state_dict(tag_dir, trust)
        steps.set_description("export: write release")
        steps.update()
        metadata = {"palette_sha256": info["palette_sha256"], "step": str(info["step"]), "source": str(tag_dir.resolve())}
        write_release(out, state, cfg, palette, metadata)
        steps.update()
    return out
