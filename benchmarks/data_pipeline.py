"""Data-stage throughput, each figure against a baseline measured in the same run.

- shard: CIFAR-10 JPEG tars -> uniform9 token shards at 32x32, end to end with all cores, against a
  naive single-process pipeline (tarfile, PIL, brute-force nearest colour) on a subset;
- quantise: the 2^24 lookup table against exact brute-force argmin (numpy int64) and a float32
  torch matmul-argmin, on the same random colours;
- loader: TokenStream tokens/s over one epoch with 2 workers, against the webdataset library
  pipeline (tar decode + .npy decode + batching) with 2 workers.

    python benchmarks/data_pipeline.py [--out benchmarks/results/data_pipeline.json] [--limit N]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# This script shares the package's name: make `data_pipeline` resolve to the package, not to this file.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from igpt.data_pipeline.loader import TokenStream
from igpt.data_pipeline.palette import save_palette, uniform9_palette
from igpt.data_pipeline.quantize import Quantizer, build_lut, quantize_bruteforce
from igpt.data_pipeline.shard import shard_dataset

CIFAR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-train"


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the shard workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def naive_shard_rate(tar: Path, palette: np.ndarray, n: int) -> float:
    """Images/s of the obvious pipeline: tarfile + PIL decode + brute-force quantise, one process."""
    from PIL import Image

    t0 = time.perf_counter()
    done = 0
    with tarfile.open(tar) as tf:
        for m in tf:
            if m.name.endswith(".jpg"):
                rgb = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB"))
                quantize_bruteforce(rgb, palette)
                done += 1
                if done == n:
                    break
    return done / (time.perf_counter() - t0)


def bench_shard(work: Path, limit: int | None) -> dict:
    palette_path = work / "palette" / "palette.npy"
    save_palette(uniform9_palette(), palette_path)
    t0 = time.perf_counter()
    Quantizer.from_file(palette_path)  # builds and caches the table (the `igpt palette fit` step)
    lut_build_s = time.perf_counter() - t0
    sources = [str(CIFAR / "cifar10-train-{000000..000009}.tar")]
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    # 5,000 per shard, fewer with --limit: the loader benchmark's 2 workers each need a train shard
    shard_size = 5000 if limit is None else max(1, min(5000, limit // 4))
    m = shard_dataset(sources, work / "tokens", palette_path, resolution=32, val_fraction=0.1,
                      shard_size=shard_size, num_workers=os.cpu_count(), limit=limit, progress=False)
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    images = m.num_inputs
    naive = naive_shard_rate(CIFAR / "cifar10-train-000000.tar", uniform9_palette(), 300)
    return {"images": images, "seconds": wall, "images_per_s": images / wall, "workers": os.cpu_count(),
            "cpu_seconds": cpu, "images_per_cpu_s": images / cpu,
            "load_average_1min": os.getloadavg()[0],
            "naive_images_per_s": naive, "speedup_vs_naive": images / wall / naive, "lut_build_s": lut_build_s,
            "target_images_per_s": 10_000}


def bench_quantise() -> dict:
    palette = uniform9_palette()
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (1 << 18, 3), dtype=np.uint8)
    q = Quantizer(palette)
    t0 = time.perf_counter()
    brute = quantize_bruteforce(colours, palette)
    brute_rate = len(colours) / (time.perf_counter() - t0)
    pal = torch.from_numpy(palette).float()
    t0 = time.perf_counter()
    x = torch.from_numpy(colours).float()
    torch_out = ((pal * pal).sum(1)[None] - 2 * x @ pal.T).argmin(1)
    torch_rate = len(colours) / (time.perf_counter() - t0)
    images = rng.integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8)
    q.quantize(images)
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        q.quantize(images)
    lut_rate = reps * images.size // 3 / (time.perf_counter() - t0)
    assert np.array_equal(q.quantize(colours), brute)
    t0 = time.perf_counter()
    build_lut(palette)
    build_s = time.perf_counter() - t0
    return {"lut_pixels_per_s": lut_rate, "bruteforce_numpy_pixels_per_s": brute_rate,
            "bruteforce_torch_f32_pixels_per_s": torch_rate, "speedup_vs_bruteforce": lut_rate / brute_rate,
            "speedup_vs_torch_matmul_argmin": lut_rate / torch_rate, "exact": True,
            "torch_f32_agrees": bool((torch_out.numpy() == brute).all()), "lut_build_s": build_s,
            "target_speedup": 100}


def bench_loader(data_dir: Path) -> dict:
    import webdataset as wds
    from torch.utils.data import DataLoader

    s = TokenStream(data_dir, "train", 256, num_workers=2, shuffle_buffer=1000)
    t0 = time.perf_counter()
    tokens = sum(b["tokens"].numel() for b in s.iter_epoch())
    ours = tokens / (time.perf_counter() - t0)

    shards = [str(data_dir / sh.file) for sh in s.shards]
    ds = (wds.WebDataset(shards, shardshuffle=False, workersplitter=wds.split_by_worker, nodesplitter=None)
          .shuffle(1000).decode().to_tuple("tokens.npy").batched(256))
    t0 = time.perf_counter()
    base = 0
    for (batch,) in DataLoader(ds, batch_size=None, num_workers=2):
        base += torch.as_tensor(batch).long().numel()
    base_rate = base / (time.perf_counter() - t0)
    return {"tokens": tokens, "tokens_per_s": ours, "webdataset_tokens_per_s": base_rate,
            "speedup_vs_webdataset": ours / base_rate, "num_workers": 2, "batch_size": 256,
            "target_tokens_per_s": 10_000_000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_pipeline.json"))
    ap.add_argument("--limit", type=int, default=None, help="shard only the first N CIFAR images")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shard = bench_shard(work, args.limit)
        print(f"shard    {shard['images_per_s']:>12,.0f} images/s  ({shard['images']} images in {shard['seconds']:.2f} s, "
              f"{shard['workers']} processes; {shard['speedup_vs_naive']:.0f}x the naive pipeline at "
              f"{shard['naive_images_per_s']:,.0f}/s; target 10,000)")
        print(f"         {shard['images_per_cpu_s']:>12,.0f} images per CPU-second  (x {shard['workers']} cores = "
              f"{shard['images_per_cpu_s'] * shard['workers']:,.0f}/s on idle cores; load average now "
              f"{shard['load_average_1min']:.1f})")
        quant = bench_quantise()
        print(f"quantise {quant['lut_pixels_per_s']:>12,.0f} pixels/s  ({quant['speedup_vs_bruteforce']:.0f}x exact brute "
              f"force, {quant['speedup_vs_torch_matmul_argmin']:.0f}x torch f32 matmul-argmin; table built in "
              f"{quant['lut_build_s']:.2f} s; target 100x)")
        loader = bench_loader(work / "tokens")
        print(f"loader   {loader['tokens_per_s']:>12,.0f} tokens/s  ({loader['speedup_vs_webdataset']:.1f}x the webdataset "
              f"pipeline at {loader['webdataset_tokens_per_s']:,.0f}/s; 2 workers; target 10,000,000)")
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "shard": shard, "quantise": quant, "loader": loader}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
