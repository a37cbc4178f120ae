"""``igpt data inspect DIR``: the manifest in words and a PNG grid of dequantised samples."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from igpt.data_pipeline.grid import chunk_rows, image_grid
from igpt.data_pipeline.loader import read_shard
from igpt.data_pipeline.manifest import Manifest
from igpt.data_pipeline.token_shards import TokenShards
from igpt.data_pipeline.quantize import dequantize
from igpt.errors import UserError


def summary(manifest: Manifest) -> str:
    """A few lines describing a token-shard manifest."""
    r = manifest.resolution
    lines = [
        f"resolution {r}x{r} ({r * r} tokens/sample), vocab {manifest.vocab_size}, "
        f"palette sha256 {manifest.palette_sha256[:16]}…",
    ]
    for name, info in manifest.splits.items():
        stored = info.stored_resolution
        size = f", stored at {stored}x{stored} for crops" if stored != r else ""
        lines.append(f"split {name}: {info.num_samples} samples in {len(info.shards)} shards{size}")
    names = manifest.class_names
    if manifest.labelled:
        lines.append(f"labelled: {manifest.num_classes} classes" + (f" ({', '.join(names)})" if names else ""))
    else:
        lines.append("unlabelled")
    skipped = manifest.skipped
    inputs = "?" if manifest.num_inputs is None else manifest.num_inputs
    if skipped:
        counts = ", ".join(f"{k}: {v}" for k, v in manifest.skipped_counts.items())
        lines.append(f"skipped {len(skipped)} of {inputs} inputs ({counts})")
    else:
        lines.append(f"skipped none of {inputs} inputs")
    return "\n".join(lines)


def sample_grid(data_dir: str | Path, split: str = "train", count: int = 64, scale: int | None = None) -> Image.Image:
    """The first ``count`` samples of a split as stored (with any margin), dequantised with the directory's
    palette, in a square grid."""
    shards = TokenShards.open(data_dir)
    data_dir, manifest, palette = shards.path, shards.manifest, shards.palette
    info = manifest.split(split)
    r = info.stored_resolution
    tokens = []
    for shard in info.shards:
        for t, _ in read_shard(str(data_dir / shard.file), r):
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
    text = summary(Manifest.load(data_dir))
    out = Path(out) if out else Path(data_dir) / f"samples-{split}.png"
    sample_grid(data_dir, split, count).save(out)
    return text, out
