"""What the training loop measures and shows besides its own loss: the validation loss and the sample grids.

``Validator.validate(step)`` is the mean nats/token over the first ``train.val_batches`` micro-batches per
rank of the validation split (all of it when null), dealt round-robin to the ranks, in the evaluation
numerics (``igpt.pretrain.precision``), with a generator seeded by ``train.seed`` (the BERT objective's
masks), so every validation of a run sees the same masks; a patch model is validated in raster order (nats per
token for the ``tokens`` target, MSE for ``pixels``). ``Validator.sample_grids(step)`` draws
unconditional samples and bottom-half completions of validation images with a generator seeded by
``train.seed + step`` and logs them as PNG artifacts (rank 0). Both are collective: every rank calls them
at the same step (ZeRO-3 gathers parameters inside them).
"""
from __future__ import annotations

import itertools
import math
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from igpt.data_pipeline.grid import chunk_rows, image_grid
from igpt.data_pipeline.loader import iterate_split
from igpt.data_pipeline.quantize import dequantize
from igpt.pretrain.config import TrainConfig
from igpt.pretrain.metrics import loss_unit
from igpt.pretrain.models import Model
from igpt.pretrain.tracking import JsonlTracker, MlflowTracker


class Validator:
    """Validation and sample grids of one rank of a run: ``engine`` wraps ``model`` (the bare model) in
    ``igpt.pretrain.train.LossModule``; ``palette`` and ``resolution`` are the token shards'."""

    def __init__(self, cfg: TrainConfig, engine, model: Model, *, rank: int, world: int, device: str,
                 palette: np.ndarray, resolution: int, tracker: MlflowTracker | JsonlTracker,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.engine, self.model = cfg, engine, model
        self.rank, self.world, self.device = rank, world, device
        self.palette, self.resolution, self.tracker, self.log = palette, resolution, tracker, log
        self.zero3 = engine.zero_optimization_stage() == 3

    def _gathered(self) -> AbstractContextManager:
        """Context with the full parameters on every rank (ZeRO-3), for sampling outside forward()."""
        if not self.zero3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()))

    def validate(self, step: int) -> float:
        """Collective: the validation loss in nats/token (or a pixels target's MSE), tracked (``val_loss``, and
        ``val_bpp`` for a likelihood) and logged at ``step``."""
        val = self.loss()
        likelihood = self.model.cfg.likelihood
        self.tracker.log_metrics({"val_loss": val, **({"val_bpp": val / math.log(2)} if likelihood else {})}, step)
        self.log(f"step {step} | val loss {val:.4f} ({loss_unit(val, likelihood)})")
        return val

    @torch.no_grad()
    def loss(self) -> float:
        """Collective: mean nats/token over this validation's batches of every rank (NaN when there are none)."""
        t = self.cfg.train
        batches = iterate_split(self.cfg.data.dir, self.cfg.data.val_split, t.micro_batch_size)
        if t.val_batches is not None:
            batches = itertools.islice(batches, t.val_batches * self.world)
        mine = [b["tokens"] for i, b in enumerate(batches) if i % self.world == self.rank]
        n_batches = torch.tensor([len(mine)], device=self.device)
        if self.world > 1:  # every rank runs the same number of forwards (ZeRO-3 gathers in them)
            dist.all_reduce(n_batches, op=dist.ReduceOp.MAX)
        self.engine.eval()
        total, count = torch.zeros(2, device=self.device).unbind(0)
        gen = torch.Generator(device=self.device).manual_seed(t.seed)
        for i in range(int(n_batches)):
            tokens = mine[min(i, len(mine) - 1)].to(self.device) if mine else None
            if tokens is None:  # a rank with no batch of its own still joins the forward
                tokens = torch.zeros(1, self.resolution ** 2, dtype=torch.long, device=self.device)
            weight = tokens.numel() if i < len(mine) else 0  # a padding forward counts nothing
            loss = self.engine(tokens, gen, evaluate=True)
            total += loss.float() * weight
            count += weight
        self.engine.train()
        both = torch.stack([total, count])
        if self.world > 1:
            dist.all_reduce(both)
        total, count = both.tolist()
        return total / count if count else float("nan")

    @torch.no_grad()
    def sample_grids(self, step: int) -> None:
        """Collective: unconditional samples and bottom-half completions of validation images at ``step``, as
        PNG artifacts (rank 0); nothing for a non-autoregressive objective or a patch model's pixels target."""
        if self.cfg.model.objective != "ar" or not self.cfg.model.likelihood:
            return
        t = self.cfg.train
        n, res = t.sample_count, self.resolution
        gen = torch.Generator(device=self.device).manual_seed(t.seed + step)
        val = next(iter(iterate_split(self.cfg.data.dir, self.cfg.data.val_split, n)))["tokens"]
        val = val.to(self.device)
        half = (res // 2) * res
        self.engine.eval()
        with self._gathered():
            uncond = self.model.generate(n, temperature=t.sample_temperature, generator=gen)
            completed = self.model.generate(prefix=val[:, :half], n_tokens=res * res,
                                            temperature=t.sample_temperature, generator=gen)
        self.engine.train()
        if self.rank != 0:
            return

        def images(tokens: Tensor) -> np.ndarray:
            return dequantize(tokens.cpu().numpy().reshape(-1, res, res), self.palette)

        def grid(rgb: np.ndarray) -> np.ndarray:  # n images per row, 4x upscaled
            return image_grid(chunk_rows(rgb, n), scale=4)

        self.tracker.log_image(grid(images(uncond)), f"samples/step_{step:08d}_uncond.png")
        pairs = np.concatenate([images(val), images(completed)])  # originals above their completions
        self.tracker.log_image(grid(pairs), f"samples/step_{step:08d}_completions.png")
