"""Training-step throughput: our training loop's step against a plain PyTorch loop, eager and compiled.

    python benchmarks/train_throughput.py --data DIR32 --device cuda --out benchmarks/results/train_throughput_h200.json
    python benchmarks/train_throughput.py --data DIR16 --device cpu   # igpt-tiny, 16x16 context
    python benchmarks/train_throughput.py --shapes igpt-s --ways ours_triton_compile ours_triton   # random shards

Each shape runs these ways in one process, on the same random tokens:
  plain          IGPT with SDPA, fused AdamW(0.9, 0.95), clip_grad_norm_, bf16 autocast on GPU (fp32 on
                 CPU): the baseline every ratio is measured against;
  plain_compile  the same with torch.compile(model) (GPU, or --compile-cpu);
  ours           ``igpt.pretrain.train.Trainer.train_step`` (the real step: DeepSpeed ZeRO-0 engine,
                 ``train.precision=auto`` (bf16 autocast on GPU), the device-side loss / non-finite /
                 preemption record and its ``StepRecords`` read-back), SDPA attention;
  ours_compile   the same with ``train.compile=true`` (engine.compile());
  ours_BACKEND[_compile]  ours with ``model.attn_backend=BACKEND`` (triton: GPU, or the CPU interpreter),
                 e.g. ours_triton, ours_triton_compile, ours_auto_compile.
The context is the token shards' (``--data``: 32x32 shards → 1024; without it, throwaway shards of random
images at ``--resolution``: only their manifest matters, every step takes the same random tokens).
tokens/s = batch × context × timed steps / seconds after ``--warmup`` untimed steps; ``warmup_s`` is
reported separately, and for the compiled ways ``compile_s`` = warmup_s − warmup × step time (the first
step's compilation), ``graph_breaks`` (Dynamo's count) and ``dynamo_warnings`` (e.g. tracing into
lru_cache-wrapped functions). The process's CPU seconds are reported too: on a one-thread CPU
run they measure the work whatever else the machine runs (``cpu_vs_plain``); on a GPU they are the host's
time to issue a step (``host_ms_per_step``). MFU = tokens/s × model.flops_per_token() / peak (igpt.pretrain.tracking.PEAK_TFLOPS
by device name, or --peak-tflops).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from igpt.data_pipeline.io import write_json_atomic  # noqa: E402
from igpt.pretrain.model import IGPT  # noqa: E402
from igpt.pretrain.presets import model_config  # noqa: E402
from igpt.pretrain.tracking import device_label, peak_flops  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GPU_SHAPES = {"igpt-s": 32, "igpt-m": 16, "igpt-l": 8}  # preset → micro-batch per GPU
CPU_SHAPES = {"igpt-tiny": 16}
DYNAMO_WARNINGS: Counter = Counter()


def parse_way(way: str) -> tuple[str, str, bool]:
    """(loop: plain or ours, attention backend, compiled) of a way's name, e.g. ours_sdpa_cudnn_compile."""
    loop, _, rest = way.partition("_")
    compiled = rest == "compile" or rest.endswith("_compile")
    backend = rest.removesuffix("compile").rstrip("_") or "sdpa"
    if loop not in ("plain", "ours") or (loop == "plain" and backend != "sdpa"):
        raise ValueError(f"unknown way {way!r}: plain[_compile] or ours[_BACKEND][_compile]")
    return loop, backend, compiled


def random_shards(root: Path, resolution: int) -> Path:
    """Token shards of 64 random images (uniform9 palette) under ``root``, for ways that only need a manifest."""
    import numpy as np
    from PIL import Image

    from igpt.data_pipeline.palette import save_palette, uniform9_palette
    from igpt.data_pipeline.shard import shard_dataset

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for i in range(64):
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    save_palette(uniform9_palette(), root / "palette.npy")
    shard_dataset([str(root / "images")], root / "tokens", root / "palette.npy", resolution=resolution,
                  num_workers=1, progress=False)
    return root / "tokens"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(step: Callable[[], None], device: str, warmup: int, steps: int) -> tuple[float, float, float]:
    """(seconds of ``warmup`` untimed calls, wall seconds and this process's CPU seconds of ``steps`` timed
    calls) of ``step``; the warnings Dynamo gives during the warm-up are counted in ``DYNAMO_WARNINGS``."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(warmup):
            step()
        _sync(device)
    DYNAMO_WARNINGS.update(str(w.message)[:120] for w in caught if "_dynamo" in w.filename)
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    _sync(device)
    return t1 - t0, time.perf_counter() - t1, time.process_time() - c1


def plain_loop(preset: str, batch: int, ctx: int, device: str, compiled: bool, warmup: int,
               steps: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = IGPT(model_config(preset, n_ctx=ctx, attn_backend="sdpa")).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    loss_fn = torch.compile(model.loss) if compiled else model.loss
    tokens = torch.randint(0, 512, (batch, ctx), device=device)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time(step, device, warmup, steps)


def our_step(data: str, preset: str, batch: int, device: str, backend: str, compiled: bool, warmup: int,
             steps: int) -> tuple[float, float, float]:
    from igpt.pretrain.config import load_config
    from igpt.pretrain.metrics import StepRecords
    from igpt.pretrain.train import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(REPO / "configs" / "cifar10-cpu-tiny.yaml", [
            f"data.dir={data}", f"train.run_dir={run_dir}", f"model.preset={preset}", f"model.attn_backend={backend}",
            f"train.micro_batch_size={batch}", "deepspeed.zero_stage=0", f"train.device={device}",
            "train.precision=auto", f"train.compile={str(compiled).lower()}", "logging.backend=jsonl",
            "data.num_workers=0"])
        trainer = Trainer(cfg)
        ctx = trainer.model_cfg.n_ctx
        tokens = torch.randint(0, trainer.model_cfg.vocab_size, (batch, ctx))
        batches = iter(lambda: {"tokens": tokens.pin_memory() if device == "cuda" else tokens}, None)
        records = StepRecords(device)

        def step() -> None:
            records.push(trainer.state.step, 1e-4, trainer.train_step(batches, 1e-4))
            records.pop()

        try:
            return _time(step, device, warmup, steps)
        finally:
            trainer.tracker.close("FINISHED")
            trainer.checkpointer.close()
            trainer.engine.destroy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="token shards whose resolution sets the context (default: random ones)")
    ap.add_argument("--resolution", type=int, default=32, help="of the random shards made without --data")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="*", help="presets (default: igpt-s/m/l on cuda, igpt-tiny on cpu)")
    ap.add_argument("--batch", type=int, help="micro-batch for every shape (default per shape)")
    ap.add_argument("--ways", nargs="*", help="plain[_compile] or ours[_BACKEND][_compile], e.g. ours_triton_compile")
    ap.add_argument("--compile-cpu", action="store_true", help="also run the compiled ways on CPU")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the peak-FLOPs table")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput.json"))
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.data is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="igpt-random-shards-"))
            args.data = str(random_shards(Path(tmp), args.resolution))
        return run(args)


def run(args: argparse.Namespace) -> int:
    from igpt.data_pipeline.manifest import Manifest
    from igpt.pretrain.deepspeed_ops import load_shm_op
    from igpt.pretrain.distributed import setup_env

    cuda = args.device == "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    setup_env()
    import deepspeed

    load_shm_op()

    ctx = Manifest.load(args.data).tokens_per_sample
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    steps = args.steps if args.steps is not None else (30 if cuda else 5)
    table = GPU_SHAPES if cuda else CPU_SHAPES
    shapes = {s: table.get(s, 8) for s in args.shapes} if args.shapes else table
    compiled = cuda or args.compile_cpu
    ways = args.ways or (["plain"] + (["plain_compile"] if compiled else []) + ["ours"]
                         + (["ours_compile"] if compiled else []) + (["ours_triton"] if cuda else []))
    peak = peak_flops(args.device, args.peak_tflops)
    results = {"device": device_label(args.device), "peak_tflops": peak / 1e12, "context": ctx, "warmup_steps": warmup,
               "timed_steps": steps, "torch": torch.__version__, "deepspeed": deepspeed.__version__, "shapes": {}}
    for preset, default_batch in shapes.items():
        batch = args.batch or default_batch
        with torch.device("meta"):  # counts only, no memory
            flops_per_token = IGPT(model_config(preset, n_ctx=ctx)).flops_per_token()
        row: dict[str, dict] = {}
        for way in ways:
            loop, backend, compiled_way = parse_way(way)
            torch._dynamo.utils.counters.clear()
            DYNAMO_WARNINGS.clear()
            if loop == "plain":
                warm_s, seconds, cpu_s = plain_loop(preset, batch, ctx, args.device, compiled_way, warmup, steps)
            else:
                warm_s, seconds, cpu_s = our_step(args.data, preset, batch, args.device, backend, compiled_way,
                                                  warmup, steps)
            breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
            torch._dynamo.reset()  # drop compiled graphs holding the last model's weights
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            tok_s = batch * ctx * steps / seconds
            row[way] = {"tokens_per_s": tok_s, "step_ms": 1e3 * seconds / steps, "warmup_s": warm_s,
                        "tokens_per_cpu_s": batch * ctx * steps / cpu_s, "host_ms_per_step": 1e3 * cpu_s / steps,
                        "mfu": tok_s * flops_per_token / peak}
            if compiled_way:
                row[way].update(compile_s=warm_s - warmup * seconds / steps, graph_breaks=breaks,
                                dynamo_warnings=dict(DYNAMO_WARNINGS))
        for way in ways:
            row[way]["vs_plain"] = row[way]["tokens_per_s"] / row["plain"]["tokens_per_s"] if "plain" in row else None
            if "plain" in row:
                row[way]["cpu_vs_plain"] = row[way]["tokens_per_cpu_s"] / row["plain"]["tokens_per_cpu_s"]
            if "plain_compile" in row:
                row[way]["vs_plain_compile"] = row[way]["tokens_per_s"] / row["plain_compile"]["tokens_per_s"]
        results["shapes"][preset] = {"micro_batch": batch, "flops_per_token": flops_per_token, **row}
        for way, r in row.items():
            ratio = "" if r["vs_plain"] is None else f" (x{r['vs_plain']:.2f} plain; per CPU second x{r['cpu_vs_plain']:.2f})"
            compiled_note = (f", compile {r['compile_s']:.1f} s, {r['graph_breaks']} graph breaks, "
                             f"{sum(r['dynamo_warnings'].values())} Dynamo warnings" if "compile_s" in r else "")
            print(f"{preset:>10} b{batch} ctx{ctx} {way:>13}: {r['tokens_per_s'] / 1e3:.1f}k tok/s, {r['step_ms']:.1f} ms/step "
                  f"MFU {100 * r['mfu']:.2f}%{ratio}, host {r['host_ms_per_step']:.1f} ms/step, "
                  f"warm-up {r['warmup_s']:.1f} s{compiled_note}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
