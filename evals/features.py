"""Probe features: average-pooled normalised block inputs, extracted once per checkpoint and layer.

Features are cached on disk as ``CACHE/<checkpoint id>/<data id>/<split>[-n<limit>]-L<layer>.npy``
(float32, (N, D)) with the labels beside them, where the checkpoint id is the sha256 of the
model's weights and the data id the sha256 of the split's manifest entry and palette. All
missing layers of a split come out of one pass over the data.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from igpt.data_pipeline.io import atomic_path
from igpt.evals.inputs import EvalData, check_layers
from igpt.pretrain.model import IGPT
from igpt.pretrain.precision import eval_autocast


def checkpoint_identity(model: IGPT) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the model's parameters and buffers."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_identity(data: EvalData, split: str) -> str:
    """sha256 of what determines a split's content: palette, resolution and its shard list."""
    m = data.manifest
    key = {"palette": m.palette_sha256, "resolution": m.resolution, "split": m.splits[split].to_dict()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array)


@torch.no_grad()
def extract_features(
    model: IGPT,
    data: EvalData,
    split: str,
    layers: list[int],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    labels: bool = True,
) -> tuple[dict[int, np.ndarray], np.ndarray | None, dict[str, float]]:
    """One pass over ``split``: ({layer: (N, D) float32}, labels (N,) or None, timing stats), in the
    evaluation numerics of ``igpt.pretrain.precision``."""
    layers = check_layers(layers, model.cfg.n_layer)
    model.eval().to(device)
    feats: dict[int, list[np.ndarray]] = {l: [] for l in layers}
    labs: list[np.ndarray] = []
    n, t0 = 0, time.perf_counter()
    for batch in data.batches(split, batch_size, labels=labels, limit=limit, progress=f"features {split}"):
        tokens = batch["tokens"].to(device, non_blocking=True)
        with eval_autocast(tokens.device):
            out = model.features(tokens, layers)
        for l in layers:
            feats[l].append(out[l].float().cpu().numpy())
        if labels:
            labs.append(batch["labels"].numpy())
        n += len(batch["tokens"])
    seconds = time.perf_counter() - t0
    stats = {"images": n, "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else float("nan")}
    return (
        {l: np.concatenate(v) for l, v in feats.items()},
        np.concatenate(labs).astype(np.int64) if labels else None,
        stats,
    )


class FeatureCache:
    """Disk cache of probe features for one checkpoint."""

    def __init__(self, root: str | Path, model: IGPT, checkpoint_id: str | None = None):
        self.root = Path(root)
        self.model = model
        self.checkpoint_id = checkpoint_id or checkpoint_identity(model)

    def _dir(self, data: EvalData, split: str) -> Path:
        return self.root / self.checkpoint_id[:32] / data_identity(data, split)[:32]

    @staticmethod
    def _stem(split: str, limit: int | None) -> str:
        return split if limit is None else f"{split}-n{limit}"

    def paths(self, data: EvalData, split: str, layer: int, limit: int | None = None) -> tuple[Path, Path]:
        """(features file, labels file) for one split and layer."""
        d, stem = self._dir(data, split), self._stem(split, limit)
        return d / f"{stem}-L{layer}.npy", d / f"{stem}-labels.npy"

    def get(
        self,
        data: EvalData,
        split: str,
        layers: list[int],
        *,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        limit: int | None = None,
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Features {layer: (N, D)} and labels (N,) of a labelled split, extracting only what is missing."""
        data.num_samples(split, labels=True)
        layers = check_layers(layers, self.model.cfg.n_layer)
        missing = [l for l in layers if not self.paths(data, split, l, limit)[0].exists()]
        labels_path = self.paths(data, split, layers[0], limit)[1]
        if missing or not labels_path.exists():
            feats, labels, _ = extract_features(
                self.model, data, split, missing or layers[:1], batch_size=batch_size, device=device, limit=limit
            )
            labels_path.parent.mkdir(parents=True, exist_ok=True)
            for l, f in feats.items():
                _save_npy(self.paths(data, split, l, limit)[0], f)
            _save_npy(labels_path, labels)
        labels = np.load(labels_path)
        return {l: np.load(self.paths(data, split, l, limit)[0], mmap_mode="r") for l in layers}, labels
