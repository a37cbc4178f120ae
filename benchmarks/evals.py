"""Eval benchmarks: feature-extraction throughput and linear-probe fit time against scikit-learn.

1. Feature extraction (images/s) with ``IGPT.features`` for one layer, against the baseline of a
   full forward pass with all hidden states (what a naive extractor does), same model and batches.
2. Probe fit: our full-batch torch L-BFGS against scikit-learn's lbfgs ``LogisticRegression`` with
   the same L2 penalty (C = 1 / (l2 · n)) on the same standardised features: wall time, accuracy and
   training objective of each.

Images are the first N CIFAR-10 training images from the shared raw-image shards, quantised with
the uniform 9-bit palette. Writes JSON (default benchmarks/results/evals.json).

    python -m benchmarks.evals [--preset igpt-mini] [--resolution 32] [--images 3000] [--device auto] [--out PATH]
    (on a busy CPU: --preset igpt-tiny --resolution 16 --images 2000 --val-images 500)
"""
from __future__ import annotations

import argparse
import io
import platform
import sys
import time
import warnings
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path and its name would shadow the
# `evals` package: drop that entry (``python -m benchmarks.evals`` needs no such help).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from igpt.data_pipeline.io import write_json_atomic
from igpt.data_pipeline.palette import uniform9_palette
from igpt.data_pipeline.quantize import Quantizer
from igpt.evals.probe import fit_probe
from igpt.pretrain.model import IGPT
from igpt.pretrain.presets import model_config

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train"


def load_cifar(n: int, resolution: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """First n images (n, R, R, 3) uint8 (box-downsampled from 32x32) and labels (n,) of the shared CIFAR-10 shards."""
    urls = [str(p) for p in sorted(CIFAR.glob("cifar10-train-*.tar"))]
    imgs, labels = [], []
    for jpg, cls in wds.WebDataset(urls, shardshuffle=False).to_tuple("jpg", "cls"):
        img = Image.open(io.BytesIO(jpg)).convert("RGB")
        if img.size != (resolution, resolution):
            img = img.resize((resolution, resolution), Image.BOX)
        imgs.append(np.asarray(img))
        labels.append(int(cls))
        if len(imgs) == n:
            break
    return np.stack(imgs), np.asarray(labels)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def throughput(fn, tokens: torch.Tensor, batch_size: int, device: torch.device, repeats: int) -> float:
    """Images/s of ``fn(batch)`` over all of ``tokens`` (best of ``repeats`` passes, after one warm-up batch)."""
    fn(tokens[:batch_size].to(device))
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(tokens), batch_size):
            fn(tokens[i : i + batch_size].to(device))
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return len(tokens) / best


def bench_probe(xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, l2: float,
                max_iter: int, device: torch.device) -> dict[str, float]:
    """Fit time / accuracy / objective of our probe and of scikit-learn's on the same data."""
    from sklearn.linear_model import LogisticRegression

    # warm-up of both (first-call costs: lazy imports, allocator, thread pools) outside the timings
    fit_probe(xtr[:64], ytr[:64], l2, 10, max_iter=3, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 3-iteration warm-up does not converge, by design
        LogisticRegression(max_iter=3).fit(xtr[:64], ytr[:64])
    _sync(device)
    t0 = time.perf_counter()
    ours = fit_probe(xtr, ytr, l2, 10, max_iter=max_iter, device=device)
    _sync(device)
    t_ours = time.perf_counter() - t0
    ours_acc = ours.evaluate(torch.as_tensor(xva), torch.as_tensor(yva))["accuracy"]

    mean, std = xtr.mean(0), np.maximum(xtr.std(0), 1e-6)
    ztr, zva = (xtr - mean) / std, (xva - mean) / std
    sk = LogisticRegression(C=1.0 / (l2 * len(xtr)), solver="lbfgs", max_iter=max_iter, tol=1e-6)
    t0 = time.perf_counter()
    sk.fit(ztr, ytr)
    t_sk = time.perf_counter() - t0
    sk_acc = float((sk.predict(zva) == yva).mean())
    logits = torch.as_tensor(ztr @ sk.coef_.T + sk.intercept_)
    sk_obj = F.cross_entropy(logits, torch.as_tensor(ytr)).item() + 0.5 * l2 * float((sk.coef_ ** 2).sum())
    return {
        "n_train": len(xtr), "dim": xtr.shape[1], "l2": l2,
        "ours_seconds": t_ours, "ours_val_acc": ours_acc, "ours_objective": ours.train_loss,
        "ours_iterations": ours.iterations,
        "sklearn_seconds": t_sk, "sklearn_val_acc": sk_acc, "sklearn_objective": sk_obj,
        "sklearn_iterations": int(np.max(sk.n_iter_)),
        "speedup_vs_sklearn": t_sk / t_ours,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="igpt-mini")
    ap.add_argument("--resolution", type=int, default=32, help="images are box-downsampled to this size")
    ap.add_argument("--images", type=int, default=3000, help="probe training images")
    ap.add_argument("--val-images", type=int, default=1000)
    ap.add_argument("--throughput-images", type=int, default=512, help="images per timed extraction pass")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--layer", type=int, default=None, help="probed layer (default: the middle block)")
    ap.add_argument("--l2", type=float, default=1.0)
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "evals.json"))
    args = ap.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(0)
    n = args.images + args.val_images
    rgb, labels = load_cifar(n, args.resolution)
    tokens = torch.from_numpy(Quantizer(uniform9_palette()).quantize(rgb).reshape(n, -1).astype(np.int64))
    model = IGPT(model_config(args.preset, n_ctx=tokens.shape[1])).to(device).eval()
    layer = model.cfg.n_layer // 2 if args.layer is None else args.layer

    timed = tokens[: args.throughput_images]
    feats_ips = throughput(lambda t: model.features(t, [layer]), timed, args.batch_size, device, args.repeats)
    full_ips = throughput(lambda t: [h.mean(1) for h in model(t, return_hidden=True).hidden_states],
                          timed, args.batch_size, device, args.repeats)
    with torch.no_grad():
        feats = torch.cat([model.features(tokens[i : i + 256].to(device), [layer])[layer].float().cpu()
                           for i in range(0, n, 256)]).numpy()

    tr, va = slice(0, args.images), slice(args.images, n)
    pixels = rgb.reshape(n, -1).astype(np.float32) / 255.0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    result = {
        "device": str(device), "device_name": name,
        "torch_threads": torch.get_num_threads(), "preset": args.preset, "layer": layer,
        "feature_extraction": {
            "images": len(timed), "resolution": args.resolution, "batch_size": args.batch_size,
            "features_images_per_s": feats_ips,
            "baseline_full_forward_images_per_s": full_ips, "ratio_vs_full_forward": feats_ips / full_ips,
        },
        "probe_raw_pixels": bench_probe(pixels[tr], labels[tr], pixels[va], labels[va], args.l2, args.max_iter,
                                        device),
        "probe_model_features": bench_probe(feats[tr], labels[tr], feats[va], labels[va], args.l2, args.max_iter,
                                            device),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(result, out)
    fe = result["feature_extraction"]
    print(f"device {result['device']} ({result['device_name']}), preset {args.preset}, layer {layer}")
    print(f"feature extraction: {fe['features_images_per_s']:.1f} images/s, "
          f"{fe['ratio_vs_full_forward']:.2f}x the full forward with all hidden states "
          f"({fe['baseline_full_forward_images_per_s']:.1f} images/s)")
    for name in ("probe_raw_pixels", "probe_model_features"):
        p = result[name]
        print(f"{name} (n={p['n_train']}, d={p['dim']}, l2={p['l2']}): ours {p['ours_seconds']:.2f}s "
              f"acc {p['ours_val_acc']:.4f} obj {p['ours_objective']:.5f} | "
              f"sklearn lbfgs {p['sklearn_seconds']:.2f}s "
              f"acc {p['sklearn_val_acc']:.4f} obj {p['sklearn_objective']:.5f} | speed-up {p['speedup_vs_sklearn']:.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
