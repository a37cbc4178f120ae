"""Training-step throughput: our DeepSpeed engine (SDPA and Triton attention) vs a plain PyTorch loop.

    python benchmarks/train_throughput.py --device cuda --out benchmarks/results/train_throughput_h100.json
    python benchmarks/train_throughput.py --device cpu   # igpt-tiny, 16x16 context, fp32

Every shape runs the same step three (GPU) or two (CPU) ways in one process, on random tokens:
  plain      - IGPT with SDPA, fused AdamW(0.9, 0.95), bf16 autocast and torch.compile on GPU
               (fp32, no compile on CPU): the baseline every ratio is measured against.
  ds_sdpa    - the training loop's path: LossModule → deepspeed.initialize with the config our
               pretrain.deepspeed_config generates (bf16, ZeRO-1 on GPU; fp32, ZeRO-0 on CPU),
               engine.backward / engine.step, gradient clipping on; ``--engine-compile`` adds
               engine.compile() (the ``train.compile`` option).
  ds_triton  - the same with the Triton flash-attention kernel (GPU only; CPU would interpret it).
tokens/s = batch × context × timed steps / seconds; MFU = tokens/s × model.flops_per_token() / peak
(pretrain.tracking.PEAK_TFLOPS by device name, or --peak-tflops).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.config import load_config  # noqa: E402
from pretrain.deepspeed_config import build_deepspeed_config  # noqa: E402
from pretrain.distributed import setup_env  # noqa: E402
from pretrain.model import IGPT  # noqa: E402
from pretrain.presets import model_config  # noqa: E402
from pretrain.tracking import device_label, peak_flops  # noqa: E402
from pretrain.train import LossModule  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GPU_SHAPES = {"igpt-s": 32, "igpt-m": 16, "igpt-l": 8}  # preset → micro-batch per GPU at context 1024
CPU_SHAPES = {"igpt-tiny": 16}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(step, device: str, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` calls of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - t0


def plain_loop(preset: str, batch: int, ctx: int, device: str, warmup: int, steps: int) -> float:
    torch.manual_seed(0)
    model = IGPT(model_config(preset, n_ctx=ctx, attn_backend="sdpa")).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    loss_fn = torch.compile(model.loss) if device == "cuda" else model.loss
    tokens = torch.randint(0, 512, (batch, ctx), device=device)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time(step, device, warmup, steps)


def deepspeed_engine(preset: str, batch: int, ctx: int, device: str, backend: str, warmup: int, steps: int,
                     compile_engine: bool) -> float:
    import deepspeed

    stage = 1 if device == "cuda" else 0
    cfg = load_config(REPO / "configs" / "cifar10-cpu-tiny.yaml",
                      ["data.dir=unused", f"train.micro_batch_size={batch}", f"deepspeed.zero_stage={stage}",
                       f"train.device={device}", "train.precision=auto"])
    torch.manual_seed(0)
    model = IGPT(model_config(preset, n_ctx=ctx, attn_backend=backend))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    engine, _, _, _ = deepspeed.initialize(model=LossModule(model), optimizer=opt,
                                           config=build_deepspeed_config(cfg, device))
    if compile_engine:
        engine.compile()
    tokens = torch.randint(0, 512, (batch, ctx), device=engine.device)

    def step() -> None:
        loss = engine(tokens)
        engine.backward(loss)
        engine.step()

    seconds = _time(step, device, warmup, steps)
    engine.destroy()
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="*", help="presets (default: igpt-s/m/l on cuda, igpt-tiny on cpu)")
    ap.add_argument("--batch", type=int, help="micro-batch for every shape (default per shape)")
    ap.add_argument("--ctx", type=int, help="context (default 1024 on cuda, 256 on cpu)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--engine-compile", action="store_true", help="engine.compile() the DeepSpeed runs (train.compile)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the peak-FLOPs table")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput.json"))
    args = ap.parse_args(argv)

    cuda = args.device == "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    setup_env()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    ctx = args.ctx or (1024 if cuda else 256)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    steps = args.steps if args.steps is not None else (20 if cuda else 5)
    shapes = {s: (GPU_SHAPES if cuda else CPU_SHAPES).get(s, 8) for s in args.shapes} if args.shapes else \
        (GPU_SHAPES if cuda else CPU_SHAPES)
    peak = peak_flops(args.device, args.peak_tflops)
    ways = ["plain", "ds_sdpa"] + (["ds_triton"] if cuda else [])
    results = {"device": device_label(args.device), "peak_tflops": peak / 1e12, "context": ctx,
               "engine_compile": args.engine_compile, "warmup_steps": warmup, "timed_steps": steps, "torch": torch.__version__,
               "deepspeed": deepspeed.__version__, "shapes": {}}
    for preset, default_batch in shapes.items():
        batch = args.batch or default_batch
        with torch.device("meta"):  # counts only, no memory
            flops_per_token = IGPT(model_config(preset, n_ctx=ctx)).flops_per_token()
        row: dict[str, dict] = {}
        for way in ways:
            if way == "plain":
                seconds = plain_loop(preset, batch, ctx, args.device, warmup, steps)
            else:
                seconds = deepspeed_engine(preset, batch, ctx, args.device, way.split("_")[1], warmup, steps,
                                           args.engine_compile)
            torch._dynamo.reset()  # drop compiled graphs holding the last model's weights
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            tok_s = batch * ctx * steps / seconds
            row[way] = {"tokens_per_s": tok_s, "step_ms": 1e3 * seconds / steps,
                        "mfu": tok_s * flops_per_token / peak}
        for way in ways:
            row[way]["vs_plain"] = row[way]["tokens_per_s"] / row["plain"]["tokens_per_s"]
        results["shapes"][preset] = {"micro_batch": batch, "flops_per_token": flops_per_token, **row}
        line = " | ".join(f"{w} {r['tokens_per_s'] / 1e3:.1f}k tok/s MFU {100 * r['mfu']:.2f}% "
                          f"(x{r['vs_plain']:.2f})" for w, r in row.items())
        print(f"{preset:>10} b{batch} ctx{ctx}: {line}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
