"""Ray- and MLflow-free scoring of a checkpoint: validation NLL and a linear probe per layer.

For machines without Ray or MLflow (the lent GPU boxes) and for side-by-side benchmarks. The
probe follows the protocol of ``../shared/reference/plain_igpt.py`` so the two are comparable:
per layer, the L2 penalty is chosen on the last 10% of the train split (fitted on the rest), the
probe is refitted on the whole train split, and its accuracy is measured on val; the best layer
is the one with the best val accuracy. Unlike the reference, the L2 grid widens while the best
value lies at an edge (``igpt.evals.probe.widen_l2``), and ``concat`` also probes several layers' pooled
states concatenated. Features and NLL use the evaluation numerics (``igpt.pretrain.precision.eval_autocast``).

    python -m igpt.evals.score RELEASE_OR_RUN_DIR --data TOKENS_DIR --layers 4,5,6,7,8 --concat 5,6,7 --json score.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from igpt.evals.baselines import pixel_features
from igpt.evals.config import DEFAULT_L2, ProbeSearch, field_default
from igpt.evals.features import extract_features
from igpt.evals.inputs import EvalData, EvalInputError, check_compatible, check_layers, concat_label
from igpt.evals.nll import evaluate_nll
from igpt.evals.probe import fit_probe, widen_l2
from igpt.pretrain.model import IGPT

DEFAULT_WIDEN = field_default(ProbeSearch, "widen")  # rounds of widening past an edge, as `igpt eval probe`'s


def probe_layer(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                l2_grid: Sequence[float], device: torch.device | str, widen: int = DEFAULT_WIDEN) -> dict[str, Any]:
    """Val accuracy of a probe whose L2 is chosen on the last 10% of train (see the module docstring), the
    grid widened by up to ``widen`` values while the best holdout accuracy lies at one of its edges."""
    n_hold = max(1, len(train_x) // 10)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    fit_x, fit_y, hold_x, hold_y = train_x[:-n_hold], train_y[:-n_hold], train_x[-n_hold:], train_y[-n_hold:]
    holdout: dict[float, float] = {}
    todo = list(l2_grid)
    for _ in range(widen + 1):
        for l2 in todo:
            probe = fit_probe(fit_x, fit_y, l2, num_classes, device=device)
            holdout[l2] = probe.evaluate(torch.as_tensor(hold_x), torch.as_tensor(hold_y))["accuracy"]
        nxt = widen_l2(holdout)
        if nxt is None:
            break
        todo = [nxt]
    best_l2 = max(holdout, key=holdout.get)
    probe = fit_probe(train_x, train_y, best_l2, num_classes, device=device)
    return {"accuracy": probe.evaluate(torch.as_tensor(val_x), torch.as_tensor(val_y))["accuracy"],
            "l2": best_l2, "holdout_accuracy": holdout, "l2_at_edge": widen_l2(holdout) is not None}


def score_model(model: IGPT, palette_sha256: str, data_dir: str, *, layers: Sequence[int],
                device: torch.device | str, train_split: str = "train", val_split: str = "val",
                l2_grid: Sequence[float] = DEFAULT_L2, batch_size: int = 128,
                train_limit: int | None = None, concat: Sequence[int] = (),
                widen: int = DEFAULT_WIDEN, raw_pixels: bool = False) -> dict[str, Any]:
    """Val NLL (nats/token, bits/pixel; the MSE of a patch model's pixels target) and per-layer probe accuracies of ``model`` on ``data_dir``; with
    ``concat`` (two or more layers) also the probe of their pooled states concatenated, with ``raw_pixels``
    the same probe on the images' pixels (``igpt.evals.baselines.pixel_features``)."""
    data = EvalData.open(data_dir)
    check_compatible(model, palette_sha256, data)
    concat = check_layers(list(concat), model.cfg.n_layer) if concat else []
    if len(concat) == 1:
        raise EvalInputError(f"concat needs two or more layers, got {concat}")
    t0 = time.perf_counter()
    nll = evaluate_nll(model, data, val_split, batch_size=batch_size, device=device)
    result: dict[str, Any] = ({"val_mse": nll["mse"]} if "mse" in nll else  # a patch model's pixels target
                              {"val_nll": nll["nats_per_token"], "val_bits_per_pixel": nll["bits_per_pixel"]})
    result["val_images"] = nll["images"]
    wanted = sorted({*layers, *concat})
    if data.labelled and (wanted or raw_pixels):
        train_f, train_y, _ = extract_features(model, data, train_split, wanted, batch_size=batch_size,
                                               device=device, limit=train_limit)
        val_f, val_y, _ = extract_features(model, data, val_split, wanted, batch_size=batch_size, device=device)

        def probe(x_train: np.ndarray, x_val: np.ndarray) -> dict[str, Any]:
            return probe_layer(x_train, train_y, x_val, val_y, l2_grid, device, widen)

        per_layer = {layer: probe(train_f[layer], val_f[layer]) for layer in layers}
        if per_layer:
            best = max(per_layer, key=lambda layer: per_layer[layer]["accuracy"])
            result.update(probe_per_layer={str(k): v["accuracy"] for k, v in per_layer.items()},
                          probe_l2_per_layer={str(k): v["l2"] for k, v in per_layer.items()},
                          probe_l2_at_edge={str(k): v["l2_at_edge"] for k, v in per_layer.items()},
                          probe_best_layer=best, probe_best_accuracy=per_layer[best]["accuracy"])
        if concat:
            got = probe(np.concatenate([train_f[l] for l in concat], 1), np.concatenate([val_f[l] for l in concat], 1))
            result.update(probe_concat_layers=concat_label(concat), probe_concat_accuracy=got["accuracy"],
                          probe_concat_l2=got["l2"], probe_concat_l2_at_edge=got["l2_at_edge"])
        if raw_pixels:
            got = probe(pixel_features(data, train_split, limit=train_limit)[0], pixel_features(data, val_split)[0])
            result.update(raw_pixels_accuracy=got["accuracy"], raw_pixels_l2=got["l2"],
                          raw_pixels_l2_at_edge=got["l2_at_edge"])
    result["score_s"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m igpt.evals.score CHECKPOINT --data DIR …``: the scores as JSON on stdout (and in ``--json``)."""
    from igpt.pretrain.cli import add_trust_option
    from igpt.runner import add_common_options, run

    p = argparse.ArgumentParser(prog="python -m igpt.evals.score", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="release dir or training run dir")
    p.add_argument("--data", required=True, help="token shards at the training size (train and val splits)")
    p.add_argument("--layers", default="", help="block indices to probe one by one: comma-separated, 'all' or 'mid'")
    p.add_argument("--concat", default="", help="comma-separated block indices probed concatenated")
    p.add_argument("--l2", type=float, nargs="+", default=list(DEFAULT_L2), help="the initial L2 grid")
    p.add_argument("--widen", type=int, default=DEFAULT_WIDEN, help="rounds of widening the grid past an edge")
    p.add_argument("--raw-pixels", action="store_true", help="also probe the raw pixels (the baseline)")
    p.add_argument("--train-limit", type=int, default=None, help="probe on the first N train images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None, help="also write the scores here")
    add_trust_option(p)
    add_common_options(p)
    p.set_defaults(func=_cmd)
    return run(p.parse_args(argv))


def _cmd(args: argparse.Namespace) -> int:
    from igpt.data_pipeline.io import write_json_atomic
    from igpt.evals.inputs import parse_layers, pick_device
    from igpt.pretrain.release import load_model

    model, _, sha = load_model(args.checkpoint, args.trust_checkpoint)
    n_layer = model.cfg.n_layer
    layers = parse_layers(args.layers, n_layer) if args.layers else []
    concat = parse_layers(args.concat, n_layer, "--concat") if args.concat else []
    device = pick_device(args.device)
    result = score_model(model.to(device), sha, args.data, layers=layers, concat=concat,
                         device=device, l2_grid=args.l2, widen=args.widen, batch_size=args.batch_size,
                         train_limit=args.train_limit, raw_pixels=args.raw_pixels)
    if args.json:
        write_json_atomic(result, args.json)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
