"""Opening a checkpoint and a token-shard directory for an eval, refusing mismatched inputs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from igpt.data_pipeline.loader import iterate_split
from igpt.data_pipeline.token_shards import TokenShards, check_palette
from igpt.data_pipeline.progress import bar
from igpt.errors import UserError
from igpt.evals.summaries import Layer
from igpt.pretrain.models import Model
from igpt.pretrain.release import load_model


def concat_label(layers: list[int]) -> str:
    """The feature-set label of ``layers``' pooled states concatenated: ``"6+7+8"``."""
    return "+".join(map(str, layers))


def layer_order(layer: Layer) -> tuple[bool, int]:
    """Sort key: block indices in order, then concatenations."""
    return (True, 0) if isinstance(layer, str) else (False, layer)


class EvalInputError(UserError):
    """An eval's inputs are unusable (mismatched palette, missing split or labels, bad layer, ...)."""


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → the GPU when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class EvalData(TokenShards):
    """A token-shard directory (``TokenShards``: manifest, checked palette) and what the evals read of it."""

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest.class_names

    @property
    def labelled(self) -> bool:
        return self.manifest.labelled

    def num_classes(self, labels: torch.Tensor | None = None) -> int:
        """len(class_names), else (unnamed classes) one more than the largest label seen."""
        if not self.labelled:
            raise EvalInputError(f"token shards in {self.path} carry no labels")
        if self.class_names:
            return len(self.class_names)
        if labels is None:
            raise EvalInputError(f"{self.path} has labels but no class_names: pass the labels to count classes")
        return int(labels.max()) + 1

    def num_samples(self, split: str, *, labels: bool = False) -> int:
        """Samples in ``split``; an error naming the problem if it is missing, empty or unlabelled."""
        splits = self.manifest.splits
        if split not in splits:
            raise EvalInputError(f"split {split!r} not in {self.path} (available: {sorted(splits)})")
        n = splits[split].num_samples
        if n == 0:
            raise EvalInputError(f"split {split!r} in {self.path} is empty (0 samples)")
        if labels and not self.labelled:
            raise EvalInputError(
                f"split {split!r} in {self.path} has no labels; probe and finetune need a labelled split"
            )
        return n

    def batches(
        self, split: str, batch_size: int, *, labels: bool = False, limit: int | None = None,
        progress: str | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """One ordered pass over ``split`` (the first ``limit`` samples if given); ``progress`` names a
        progress bar over the images (igpt.data_pipeline.progress decides whether it shows)."""
        n = self.num_samples(split, labels=labels)
        seen = 0
        with bar(total=n if limit is None else min(n, limit), desc=progress or "", unit="img",
                 show=progress is not None) as images:
            for batch in iterate_split(self.path, split, batch_size, with_labels=labels):
                if labels and "labels" not in batch:
                    raise EvalInputError(f"split {split!r} in {self.path} has samples without labels")
                if limit is not None:
                    batch = {k: v[: limit - seen] for k, v in batch.items()}
                seen += len(batch["tokens"])
                if len(batch["tokens"]):
                    yield batch
                    images.update(len(batch["tokens"]))
                if limit is not None and seen >= limit:
                    return

    def tokens(
        self, split: str, *, labels: bool = False, limit: int | None = None, batch_size: int = 256
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole split in memory: tokens (N, R*R) long, labels (N,) or None."""
        toks, labs = [], []
        for b in self.batches(split, batch_size, labels=labels, limit=limit):
            toks.append(b["tokens"])
            if labels:
                labs.append(b["labels"])
        if not toks:
            raise EvalInputError(f"split {split!r} in {self.path} yielded no samples")
        return torch.cat(toks), (torch.cat(labs) if labels else None)


def load_checked(checkpoint: str | Path, data: EvalData, trust: bool = False) -> tuple[Model, dict[str, Any], str]:
    """Load a checkpoint (``trust``: as ``load_model``'s) and refuse it if its palette or geometry does not
    match the shards."""
    model, config, palette_sha = load_model(checkpoint, trust)
    check_compatible(model, palette_sha, data, checkpoint)
    return model, config, palette_sha


def check_compatible(model: Model, palette_sha: str, data: EvalData, checkpoint: str | Path = "checkpoint") -> None:
    """Palette sha256, vocabulary and context length of the model against the shards' manifest."""
    check_palette(palette_sha, data.palette_sha256, f"checkpoint {checkpoint} against the shards in {data.path}",
                  error=EvalInputError)
    cfg = model.cfg
    vocab = data.manifest.vocab_size
    if vocab > cfg.vocab_size:
        raise EvalInputError(f"shards use {vocab} tokens but the model's vocabulary is {cfg.vocab_size}")
    if cfg.unit == "patch":
        if data.resolution != model.side:
            raise EvalInputError(f"shards at resolution {data.resolution} do not fit a patch model of "
                                 f"{model.side}x{model.side} images")
    elif data.resolution ** 2 > cfg.n_ctx:
        raise EvalInputError(
            f"shards at resolution {data.resolution} need context {data.resolution ** 2}, "
            f"the model's is {cfg.n_ctx}"
        )


def check_layers(layers: list[int], n_layer: int) -> list[int]:
    """Validate probe layer indices: 0..n_layer (n_layer = the final-norm output)."""
    bad = [l for l in layers if not 0 <= l <= n_layer]
    if bad:
        raise EvalInputError(f"layer index {bad} out of range: the model has layers 0..{n_layer}")
    return sorted(set(layers))


def parse_layers(spec: str, n_layer: int, option: str = "--layers") -> list[int]:
    """``all`` → 0..n_layer-1 (block inputs); ``mid`` → the middle block; else comma-separated ints. ``option``
    names the command-line option in the errors."""
    if spec == "all":
        return list(range(n_layer))
    if spec == "mid":
        return [n_layer // 2]
    try:
        layers = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError as e:
        raise EvalInputError(f"bad {option} {spec!r}: expected 'all', 'mid' or comma-separated integers") from e
    if not layers:
        raise EvalInputError(f"bad {option} {spec!r}: no layer given")
    return check_layers(layers, n_layer)
