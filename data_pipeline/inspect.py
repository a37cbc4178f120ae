"""``igpt data inspect DIR``: the manifest in words and a PNG grid of dequantised samples."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from igpt.data_pipeline.grid import chunk_rows, image_grid
from igpt.data_pipeline.loader import read_shard
from igpt.data_pipeline.manifest import load_manifest, split_info, stored_resolution
from igpt.data_pipeline.token_shards import TokenShards
from igpt.data_pipeline.quantize import dequantize
from igpt.errors import UserError


def summary(manifest: dict) -> str:
    """A few lines describing a token-shard manifest."""
    r = manifest["resolution"]
    lines = [
        f"resolution {r}x{r} ({r * r} tokens/sample), vocab {manifest['vocab_size']}, "
        f"palette sha256 {manifest['palette_sha256'][:16]}…",
    ]
    for name, info in manifest["splits"].items():
        stored = stored_resolution(manifest, name)
        size = f", stored at {stored}x{stored} for crops" if stored != r else ""
        lines.append(f"split {name}: {info['num_samples']} samples in {len(info['shards'])} shards{size}")
    names = manifest.get("class_names")
    if manifest.get("labelled"):
        lines.append(f"labelled: {manifest.get('num_classes')} classes" + (f" ({', '.join(names)})" if names else ""))
    else:
        lines.append("unlabelled")
    skipped = manifest["skipped"]
    if skipped:
        counts = ", ".join(f"{k}: {v}" for k, v in manifest["skipped_counts"].items())
        lines.append(f"skipped {len(skipped)} of {manifest.get('num_inputs', '?')} inputs ({counts})")
    else:
        lines.append(f"skipped none of {manifest.get('num_inputs', '?')} inputs")
    return "\n".join(lines)


def sample_grid(data_dir: str | Path, split: str = "train", count: int = 64, scale: int | None = None) -> Image.Image:
    """The first ``count`` samples of a split as stored (with any margin), dequantised with the directory's
    palette, in a square grid."""
    shards = TokenShards.open(data_dir)
    data_dir, manifest, palette = shards.path, shards.manifest, shards.palette
    r = stored_resolution(manifest, split)
    tokens = []
    for shard in split_info(manifest, split)["shards"]:
        for t, _ in read_shard(str(data_dir / shard["file"]), r):
            tokens.append(t)
            if len(tokens) == count:
                break
        if len(tokens) == count:
            break
    if not tokens:
        raise UserError(f"split {split!r} of {data_dir} has no samples")
    images = dequantize(np.stack(tokens).reshape(-1, r, r), palette)
    grid = image_grid(chunk_rows(images, math.ceil(math.sqrt(len(images)))), pad=1)
    scale = scale or max(1, 256 // r)
    return Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST)


def inspect_dir(data_dir: str | Path, out: str | Path | None = None, split: str = "train", count: int = 64) -> tuple[str, Path]:
    """Summary text and the path of the written PNG grid (default ``DIR/samples-SPLIT.png``)."""
    text = summary(load_manifest(data_dir))
    out = Path(out) if out else Path(data_dir) / f"samples-{split}.png"
    sample_grid(data_dir, split, count).save(out)
    return text, out
