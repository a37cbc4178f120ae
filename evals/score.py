"""Ray- and MLflow-free scoring of a checkpoint: validation NLL and a linear probe per layer.

For machines without Ray or MLflow (the lent GPU boxes) and for side-by-side benchmarks. The
probe follows the protocol of ``../shared/reference/plain_igpt.py`` so the two are comparable:
per layer, the L2 penalty is chosen on the last 10% of the train split (fitted on the rest), the
probe is refitted on the whole train split, and its accuracy is measured on val; the best layer
is the one with the best val accuracy. Features and NLL use the evaluation numerics
(``pretrain.precision.eval_autocast``).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

from evals.features import extract_features
from evals.inputs import EvalData, check_compatible
from evals.nll import evaluate_nll
from evals.probe import fit_probe
from pretrain.model import IGPT

DEFAULT_L2 = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def probe_layer(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                l2_grid: Sequence[float], device: torch.device | str) -> dict[str, Any]:
    """Val accuracy of a probe whose L2 is chosen on the last 10% of train (see the module docstring)."""
    n_hold = max(1, len(train_x) // 10)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    fit_x, fit_y, hold_x, hold_y = train_x[:-n_hold], train_y[:-n_hold], train_x[-n_hold:], train_y[-n_hold:]
    holdout = {}
    for l2 in l2_grid:
        probe = fit_probe(fit_x, fit_y, l2, num_classes, device=device)
        holdout[l2] = probe.evaluate(torch.as_tensor(hold_x), torch.as_tensor(hold_y))["accuracy"]
    best_l2 = max(holdout, key=holdout.get)
    probe = fit_probe(train_x, train_y, best_l2, num_classes, device=device)
    return {"accuracy": probe.evaluate(torch.as_tensor(val_x), torch.as_tensor(val_y))["accuracy"],
            "l2": best_l2, "holdout_accuracy": holdout}


def score_model(model: IGPT, palette_sha256: str, data_dir: str, *, layers: Sequence[int],
                device: torch.device | str, train_split: str = "train", val_split: str = "val",
                l2_grid: Sequence[float] = DEFAULT_L2, batch_size: int = 128,
                train_limit: int | None = None) -> dict[str, Any]:
    """Val NLL (nats/token, bits/pixel) and per-layer probe accuracies of ``model`` on ``data_dir``."""
    data = EvalData.open(data_dir)
    check_compatible(model, palette_sha256, data)
    t0 = time.perf_counter()
    nll = evaluate_nll(model, data, val_split, batch_size=batch_size, device=device)
    result: dict[str, Any] = {"val_nll": nll["nats_per_token"], "val_bits_per_pixel": nll["bits_per_pixel"],
                              "val_images": nll["images"]}
    if data.labelled and layers:
        train_f, train_y, _ = extract_features(model, data, train_split, list(layers), batch_size=batch_size,
                                               device=device, limit=train_limit)
        val_f, val_y, _ = extract_features(model, data, val_split, list(layers), batch_size=batch_size, device=device)
        per_layer = {layer: probe_layer(train_f[layer], train_y, val_f[layer], val_y, l2_grid, device)
                     for layer in layers}
        best = max(per_layer, key=lambda layer: per_layer[layer]["accuracy"])
        result.update(probe_per_layer={str(k): v["accuracy"] for k, v in per_layer.items()},
                      probe_l2_per_layer={str(k): v["l2"] for k, v in per_layer.items()},
                      probe_best_layer=best, probe_best_accuracy=per_layer[best]["accuracy"])
    result["score_s"] = time.perf_counter() - t0
    return result
