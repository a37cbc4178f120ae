"""Precision ablation: plain PyTorch loops against our DeepSpeed engine in every precision mode and
attention backend, at equal tokens, seeds, data order and initialisation; val NLL at equal steps.

    python benchmarks/precision_ablation.py --data DIR16 --steps 400 --eval-every 100      # CPU rows
    python benchmarks/precision_ablation.py --data DIR32 --config configs/cifar10-gpu-recipe.yaml \\
        --steps 400 --eval-every 100 --device cuda                                          # GPU rows

Rows (``--rows`` picks a subset): ``plain-fp32`` and ``plain-bf16`` are a plain loop (our IGPT, fused
Adam, the same schedule and clipping, torch.autocast for bf16, no DeepSpeed); ``engine-<precision>-
<backend>`` is ``igpt train`` at ZeRO-0 with ``train.precision`` = fp32 | bf16 | bf16-module (see
``igpt.pretrain.precision``) and ``model.attn_backend`` = sdpa | reference | triton (triton on GPU only: the
CPU interpreter's bf16 is wrong and slow). Every row reads the same TokenStream (same seed, workers,
batch) from the same initial weights.

Every row is scored the same way at every ``--eval-every`` step: fp32 weights (the engine's
checkpoint consolidated as ``igpt export`` does it), ``igpt.evals.nll`` over the whole val split in the
evaluation numerics (bf16 autocast on GPU, fp32 on CPU). The engine's own last validation (whole
split) is reported beside it. Writes JSON and a markdown table (``--out``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from igpt.pretrain.config import TrainConfig  # noqa: E402
from igpt.pretrain.distributed import single_process_env  # noqa: E402
from igpt.pretrain.tracking import METRICS_FILE, read_metrics  # noqa: E402

CPU_ROWS = ["plain-fp32", "plain-bf16", "engine-fp32-sdpa", "engine-bf16-sdpa", "engine-bf16-module-sdpa",
            "engine-bf16-reference"]
GPU_ROWS = ["plain-bf16", "engine-bf16-sdpa", "engine-bf16-module-sdpa", "engine-bf16-triton",
            "engine-bf16-module-triton", "plain-fp32"]


def parse_row(row: str) -> tuple[str, str, str]:
    """``engine-bf16-module-sdpa`` → ("engine", "bf16-module", "sdpa"); ``plain-bf16`` → ("plain", "bf16", "sdpa")."""
    kind, _, rest = row.partition("-")
    if kind == "plain":
        return kind, rest, "sdpa"
    precision, _, backend = rest.rpartition("-")
    return kind, precision, backend


def row_overrides(args: argparse.Namespace, row: str, run_dir: Path) -> list[str]:
    _, precision, backend = parse_row(row)
    return [f"data.dir={args.data}", f"train.run_dir={run_dir}", f"train.steps={args.steps}",
            f"train.device={args.device}", f"train.precision={precision}", f"model.attn_backend={backend}",
            "deepspeed.zero_stage=0", "logging.backend=jsonl", f"train.val_every={args.steps}",
            "train.val_batches=null", f"train.sample_every={10 * args.steps}", f"checkpoint.every={args.eval_every}",
            f"checkpoint.keep_last={args.steps // args.eval_every + 1}", *args.overrides]


def evaluate_state(state: dict, cfg: TrainConfig, data: str, device: str) -> float:
    """Val nats/token of fp32 ``state`` over the whole val split, in the evaluation numerics."""
    import torch

    from igpt.evals.inputs import EvalData
    from igpt.evals.nll import evaluate_nll
    from igpt.pretrain.model import IGPT

    model = IGPT(cfg.model)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    result = evaluate_nll(model, EvalData.open(data), cfg.data.val_split, batch_size=64, device=device)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return result["nats_per_token"]


def plain_row(args: argparse.Namespace, row: str, run_dir: Path) -> dict:
    """A plain PyTorch loop over the same stream, init, optimizer, schedule and clipping as the engine."""
    import torch

    from igpt.data_pipeline.loader import TokenStream
    from igpt.data_pipeline.manifest import Manifest
    from igpt.pretrain.config import load_config
    from igpt.pretrain.model import IGPT
    from igpt.pretrain.precision import training_autocast
    from igpt.pretrain.schedule import lr_at
    from igpt.pretrain.train import _seed_everything, resolve_model_section

    _, precision, _ = parse_row(row)
    cfg = load_config(args.config, row_overrides(args, row, run_dir))
    resolve_model_section(cfg, Manifest.load(args.data))
    t, o, dev = cfg.train, cfg.optim, args.device
    _seed_everything(t.seed)
    model = IGPT(cfg.model).to(dev)
    adam = torch.optim.Adam(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay, fused=True)
    _seed_everything(t.seed)
    stream = iter(TokenStream(args.data, cfg.data.train_split, t.micro_batch_size, num_workers=cfg.data.num_workers,
                              seed=cfg.data.seed, shuffle_buffer=cfg.data.shuffle_buffer, pin_memory=dev == "cuda",
                              hflip=cfg.data.hflip, random_crop=cfg.data.random_crop))
    curve, t0 = {}, time.perf_counter()
    for step in range(t.steps):
        for group in adam.param_groups:
            group["lr"] = lr_at(step, lr=o.lr, warmup_steps=o.warmup_steps, total_steps=t.steps, min_lr=o.min_lr)
        for _ in range(t.grad_accum):
            tokens = next(stream)["tokens"].to(dev, non_blocking=True)
            with training_autocast(precision, dev):
                loss = model.loss(tokens) / t.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip, foreach=True)
        adam.step()
        adam.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == t.steps:
            seconds = time.perf_counter() - t0
            curve[step + 1] = evaluate_state(model.state_dict(), cfg, args.data, dev)
            t0 = time.perf_counter() - seconds
    return {"val_nll": curve, "train_s": time.perf_counter() - t0}


def engine_row(args: argparse.Namespace, row: str, run_dir: Path) -> dict:
    """``igpt train`` as a plain single process, then every kept checkpoint scored as an export would be."""
    from igpt.pretrain import checkpoint as ckpt
    from igpt.pretrain.config import load_config

    env = single_process_env()
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "igpt.pretrain.cli", "train", args.config, *row_overrides(args, row, run_dir)]
    with open(run_dir.with_suffix(".log"), "w") as log:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{row} failed ({code}); see {run_dir.with_suffix('.log')}")
    seconds = time.perf_counter() - t0
    cfg = load_config(run_dir / "config.yaml")
    curve = {}
    for tag in sorted(ckpt.find_resumable(run_dir), key=lambda p: p.name):
        step = int(ckpt.TAG_RE.match(tag.name).group(1))
        curve[step] = evaluate_state(ckpt.consolidated_state_dict(tag), cfg, args.data, args.device)
    metrics = read_metrics(run_dir / "tracking" / METRICS_FILE)
    own = next(m["val_loss"] for m in reversed(metrics) if "val_loss" in m)
    return {"val_nll": curve, "training_val_loss": own, "process_s": seconds}


def run_row(args: argparse.Namespace, row: str) -> dict:
    run_dir = args.out / row
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    result = plain_row(args, row, run_dir) if row.startswith("plain") else engine_row(args, row, run_dir)
    return {k: ({str(s): v for s, v in val.items()} if isinstance(val, dict) else val) for k, val in result.items()}


def markdown(results: dict) -> str:
    rows = results["rows"]
    steps = sorted({int(s) for r in rows.values() for s in r["val_nll"]})
    head = f"Val NLL (nats/token, whole val split, fp32 weights, evaluation numerics) — {results['device']}, " \
           f"{results['shape']}, {results['tokens_per_step']} tokens/step, seed {results['seed']}"
    lines = [head, "", "| row | " + " | ".join(f"step {s}" for s in steps) + " | training's own val | seconds |",
             "|---|" + "---|" * (len(steps) + 2)]
    for name, r in rows.items():
        vals = " | ".join(f"{r['val_nll'][str(s)]:.4f}" if str(s) in r["val_nll"] else "-" for s in steps)
        own = f"{r['training_val_loss']:.4f}" if "training_val_loss" in r else "-"
        secs = r.get("process_s", r.get("train_s"))
        lines.append(f"| {name} | {vals} | {own} | {secs:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default=str(REPO / "configs" / "cifar10-cpu-tiny.yaml"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--rows", nargs="+", default=None, help=f"default: {CPU_ROWS} on cpu, {GPU_ROWS} on cuda")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "precision_ablation")
    ap.add_argument("--results", type=Path, default=None, help="JSON path (default benchmarks/results/precision_ablation_DEVICE.json)")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # worker mode: run one row, print its JSON
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every row (model shape, batch, lr)")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    if args.row:
        print("ROW " + json.dumps(run_row(args, args.row)), flush=True)
        return 0

    from igpt.data_pipeline.manifest import Manifest
    from igpt.pretrain.config import load_config
    from igpt.pretrain.train import resolve_model_section

    cfg = load_config(args.config, row_overrides(args, "plain-fp32", args.out / "x"))
    resolve_model_section(cfg, Manifest.load(args.data))
    m, t = cfg.model, cfg.train
    results = {"device": args.device, "steps": args.steps, "seed": t.seed, "config": args.config,
               "overrides": args.overrides, "shape": f"{m.n_layer}x{m.n_embd} ({m.n_head} heads), ctx {m.n_ctx}",
               "tokens_per_step": cfg.tokens_per_step(), "torch": torch.__version__,
               "rows": {}}
    stem = args.results or REPO / "benchmarks" / "results" / f"precision_ablation_{args.device}.json"
    for row in args.rows or (GPU_ROWS if args.device == "cuda" else CPU_ROWS):
        cmd = [sys.executable, __file__, "--row", row, *sys.argv[1:]] if argv is None else \
            [sys.executable, __file__, "--row", row, *argv]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("ROW ")), None)
        if out.returncode != 0 or line is None:
            print(f"{row}: failed\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}", flush=True)
            continue
        results["rows"][row] = json.loads(line[4:])
        print(f"{row}: {results['rows'][row]['val_nll']}", flush=True)
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.write_text(json.dumps(results, indent=1))
        stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
