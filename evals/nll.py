"""Likelihood of a token-shard split: nats per token, bits per pixel, and a confidence interval over images; for a
patch model with the ``pixels`` target, its mean squared error on the normalised patches instead."""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from igpt.evals.inputs import EvalData, EvalInputError
from igpt.pretrain.models import Model
from igpt.pretrain.precision import eval_autocast

Z_95 = 1.959963984540054


@torch.no_grad()
def per_image_nll(model: Model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean nats per token of each image, (B,), under the autoregressive objective (a patch model: in raster
    order; its MSE with the ``pixels`` target), in the evaluation numerics of ``igpt.pretrain.precision`` (bf16
    autocast on CUDA, fp32 on CPU; fp32 softmax)."""
    if model.cfg.unit == "patch":
        with eval_autocast(tokens.device):
            return model.position_losses(tokens).mean(1)
    with eval_autocast(tokens.device):
        logits = model(tokens).logits.float()
    nll = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
    return nll.view(tokens.shape).mean(1)


def summarize(per_image: np.ndarray, confidence_z: float = Z_95, mse: bool = False) -> dict[str, float]:
    """Mean nats/token and bits/pixel with a normal-approximation interval over images (``mse``: the values are
    mean squared errors, and so is the summary)."""
    n = len(per_image)
    if n == 0:
        raise EvalInputError("no images to average the loss over")
    mean = float(per_image.mean())
    sem = float(per_image.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    half = confidence_z * sem
    if mse:
        return {"images": n, "mse": mean, "mse_ci_low": mean - half, "mse_ci_high": mean + half, "sem_mse": sem}
    return {
        "images": n,
        "nats_per_token": mean,
        "nats_ci_low": mean - half,
        "nats_ci_high": mean + half,
        "bits_per_pixel": mean / math.log(2),
        "bpp_ci_low": (mean - half) / math.log(2),
        "bpp_ci_high": (mean + half) / math.log(2),
        "sem_nats": sem,
    }


def evaluate_nll(
    model: Model,
    data: EvalData,
    split: str,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    limit: int | None = None,
) -> dict[str, float]:
    """Loss of ``model`` on ``split`` (the first ``limit`` images if given): see ``summarize``."""
    if model.cfg.objective != "ar":
        raise EvalInputError(f"nll needs an autoregressive model; this one has objective={model.cfg.objective!r}")
    model.eval().to(device)
    values, t0 = [], time.perf_counter()
    for batch in data.batches(split, batch_size, limit=limit, progress=f"nll {split}"):
        values.append(per_image_nll(model, batch["tokens"].to(device)).cpu().numpy())
    result = summarize(np.concatenate(values).astype(np.float64), mse=not model.cfg.likelihood)
    result["seconds"] = time.perf_counter() - t0
    return result
