"""Our training against the plain PyTorch yardstick, side by side in one run: tokens/s, val NLL, probe.

    # one GPU, the GPU recipe against ../shared/reference/plain_igpt.py at ~105M tokens:
    python benchmarks/recipe_vs_plain.py --data runs/demo-gpu/tokens32 --tokens 105e6
    # CPU smoke / the CPU parity check (igpt-tiny on 16x16 shards, ~1.5M tokens):
    python benchmarks/recipe_vs_plain.py --data DIR16 --config configs/cifar10-cpu-tiny.yaml --tokens 1.5e6 --repeats 3 \\
        --device cpu train.precision=fp32 deepspeed.zero_stage=0

Both sides train the same shape (layers, width, heads from our resolved config), batch, peak
learning rate, warmup and token budget on the same shards (``steps = tokens // (batch x context)``,
as the reference computes it). Ours runs ``igpt train`` as a plain single process (jsonl tracking,
no MLflow or Ray needed), is exported, and is scored by ``igpt.evals.score`` (val NLL over the whole val
split, probes with the reference's protocol). The reference scores itself the same way: whole val
split, fp32 weights under bf16 autocast on CUDA, fp32 on CPU; L2 chosen on 10% of train, the best
layer on val. tokens/s is steps x batch x context / the training loop's seconds on both sides (ours
without validation and checkpoint time; ``first_window_s`` holds our compile/warm-up window).
Extra ``key=value`` arguments are overrides for our side only (e.g. ``train.compile=true``).

End to end: ``loop_tokens_per_s`` divides our tokens by the loop's whole wall time less validation, samples
and checkpoints (the reference times its loop the same way: batching and logging inside, evaluation outside);
``wall_time`` breaks the loop down (``igpt.pretrain.wall_time``: step, data, logging, validation, samples,
checkpoint, other). ``--repeats N`` runs N rounds, ours and the reference interleaved (their order alternating),
and reports the median and range of the ratio; rounds after the first, and every round with
``--throughput-only``, skip the export and the probes (our val NLL is then the run's own whole-split
validation, which the full round checks against the scorer's). ``--paired`` (CPU) runs the two sides of each
round at once instead, each pinned to its own CPU with one thread, swapping the CPUs every round: the machine's
drift then slows both alike, and the ratio is steady where sequential rounds on a shared machine are not.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # igpt and the sibling logged_run, also under PYTHONSAFEPATH

from igpt.data_pipeline.io import write_json_atomic  # noqa: E402
from logged_run import run_logged  # noqa: E402
from igpt.pretrain.config import TrainConfig  # noqa: E402
from igpt.pretrain.distributed import single_process_env  # noqa: E402
from igpt.pretrain.tracking import METRICS_FILE, read_metrics, training_windows  # noqa: E402
from igpt.pretrain.wall_time import loop_seconds  # noqa: E402

DEFAULT_REFERENCE = REPO.parent / "shared" / "reference" / "plain_igpt.py"


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None, cpu: int | None = None) -> None:
    """``cmd`` logged to ``log``; pinned to one ``cpu`` (``taskset``) when given."""
    run_logged((["taskset", "-c", str(cpu)] if cpu is not None else []) + cmd, log, REPO, env)


def our_throughput(rows: list[dict[str, float]], tokens_per_step: int, steps: int) -> dict:
    """tokens/s over the logged training windows, after the first one, and over the loop's wall time (less
    validation, samples and checkpoints), with the loop's wall-time breakdown, from the run's tracked rows."""
    windows = [(steps * tokens_per_step, s) for steps, s in training_windows(rows, tokens_per_step)]
    tokens, seconds = sum(w[0] for w in windows), sum(w[1] for w in windows)
    steady = windows[1:] or windows
    wall = {k.removeprefix("time_").removesuffix("_s"): v for k, v in
            next(r for r in reversed(rows) if "time_total_s" in r).items() if k.startswith("time_")}
    loop_s = loop_seconds(wall)  # validation, samples and checkpoints are outside the reference's timed loop too
    return {"tokens_per_s": tokens / seconds, "train_s": seconds, "first_window_s": windows[0][1],
            "steady_tokens_per_s": sum(w[0] for w in steady) / sum(w[1] for w in steady),
            "loop_tokens_per_s": steps * tokens_per_step / loop_s, "loop_s": loop_s, "wall_time": wall,
            "outside_step_share": (loop_s - wall["step"]) / loop_s,
            "mfu_last_window": next(r["mfu"] for r in reversed(rows) if "mfu" in r)}


def run_ours(args: argparse.Namespace, cfg: TrainConfig, steps: int, out: Path, env: dict[str, str],
             score: bool, cpu: int | None = None) -> dict:
    run_dir, release = out / "ours", out / "ours-release"
    overrides = [f"data.dir={args.data}", f"train.run_dir={run_dir}", f"train.steps={steps}",
                 "logging.backend=jsonl", f"train.val_every={steps}", "train.val_batches=null",
                 f"train.sample_every={10 * steps}", f"checkpoint.every={steps}", f"train.device={args.device}",
                 *args.overrides]
    _run([sys.executable, "-m", "igpt.pretrain.cli", "train", args.config, *overrides], out / "ours.log", env, cpu)
    rows = read_metrics(run_dir / "tracking" / METRICS_FILE)
    result = our_throughput(rows, cfg.tokens_per_step(), steps)
    result["training_val_loss"] = next(m["val_loss"] for m in reversed(rows) if "val_loss" in m)
    if not score:
        result["val_nll"] = result["training_val_loss"]
        return result
    from igpt.evals.score import score_model
    from igpt.pretrain.release import load_model

    _run([sys.executable, "-m", "igpt.pretrain.cli", "export", str(run_dir), "--out", str(release)], out / "ours.log", env)
    model, _, sha = load_model(release)
    result.update(score_model(model, sha, args.data, layers=range(model.cfg.n_layer + 1), device=args.device,
                              l2_grid=args.l2))
    return result


def run_reference(args: argparse.Namespace, cfg: TrainConfig, out: Path, env: dict[str, str], score: bool,
                  cpu: int | None = None) -> dict:
    m = cfg.model
    cmd = [sys.executable, str(args.reference), args.data, "--tokens", str(args.tokens), "--layers", str(m.n_layer),
           "--width", str(m.n_embd), "--heads", str(m.n_head), "--batch", str(cfg.global_batch()),
           "--lr", str(cfg.optim.lr), "--warmup", str(cfg.optim.warmup_steps), "--device", args.device,
           "--out", str(out / "plain.json")]
    if args.reference_compile:
        cmd.append("--compile")
    if not score:  # throughput (and val NLL) only: no probe
        cmd += ["--probe-every", "0"]
    _run(cmd, out / "plain.log", env, cpu)
    ref = json.loads((out / "plain.json").read_text())
    return {"tokens_per_s": ref["tokens_per_s"], "train_s": ref["train_s"], "val_nll": ref["val_nll_nats"],
            "probe_best_accuracy": ref.get("probe_best_val_accuracy"), "probe_best_layer": ref.get("probe_best_layer"),
            "probe_per_layer": ref.get("probe_val_accuracy_per_layer"), "tokens": args.tokens}


def run_round(args: argparse.Namespace, cfg: TrainConfig, steps: int, out: Path, env: dict[str, str],
              score: bool, reference_first: bool) -> dict:
    """One round: ours and (unless skipped) the reference, one after the other in the order given; with
    ``--paired``, both at once, each pinned to its own CPU (CPU 0 for the side given first)."""
    out.mkdir(parents=True, exist_ok=True)
    ref_args = argparse.Namespace(**{**vars(args), "tokens": args.reference_tokens or args.tokens})
    sides = ["plain", "ours"] if reference_first else ["ours", "plain"]
    if args.skip_reference:
        sides.remove("plain")
    cpus = {side: cpu for cpu, side in enumerate(sides)} if args.paired else {}
    runs = {"ours": lambda: run_ours(args, cfg, steps, out, env, score, cpus.get("ours")),
            # the reference probes only where its token budget equals ours
            "plain": lambda: run_reference(ref_args, cfg, out, env, score and not args.reference_tokens,
                                           cpus.get("plain"))}

    def timed(side: str) -> dict:  # the side's result with its CPU (paired) and when it ran (epoch seconds)
        start = time.time()
        return {**runs[side](), "cpu": cpus.get(side), "started": start, "ended": time.time()}

    if not args.paired:
        return {side: timed(side) for side in sides}
    with ThreadPoolExecutor(len(sides)) as pool:
        started = {side: pool.submit(timed, side) for side in sides}
        return {side: future.result() for side, future in started.items()}


def compare(rounds: list[dict], equal_tokens: bool) -> dict:
    """ours / plain per round (end-to-end loop tokens/s), their median and range; the val NLL delta of each."""
    ratios = [r["ours"]["loop_tokens_per_s"] / r["plain"]["tokens_per_s"] for r in rounds]
    window_ratios = [r["ours"]["tokens_per_s"] / r["plain"]["tokens_per_s"] for r in rounds]
    out = {"tokens_per_s": statistics.median(ratios), "tokens_per_s_range": [min(ratios), max(ratios)],
           "tokens_per_s_per_round": ratios, "window_tokens_per_s": statistics.median(window_ratios)}
    if equal_tokens:
        deltas = [r["ours"]["val_nll"] - r["plain"]["val_nll"] for r in rounds]
        out |= {"val_nll_delta": deltas[0], "val_nll_delta_per_round": deltas}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="token shards (manifest.json) with train and val splits")
    ap.add_argument("--config", default=str(REPO / "configs" / "cifar10-gpu-recipe.yaml"))
    ap.add_argument("--tokens", type=float, required=True, help="training tokens for each side")
    ap.add_argument("--reference-tokens", type=float, default=None,
                    help="the reference's budget, when time is short (its quality is then not comparable)")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="plain_igpt.py")
    ap.add_argument("--reference-compile", action="store_true", help="torch.compile the reference (its --compile)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds of both sides (median and range)")
    ap.add_argument("--throughput-only", action="store_true",
                    help="no export and no probes in any round (tokens/s, the breakdown and val NLL only)")
    ap.add_argument("--paired", action="store_true",
                    help="run both sides of a round at once, each pinned to its own CPU with one thread (the CPUs "
                         "swap every round), so that the machine's drift hits both alike; implies --throughput-only")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS (torch's intra-op threads) of both sides (default: this process's)")
    ap.add_argument("--l2", type=float, nargs="+", default=[2e-5, 2e-4, 2e-3, 2e-2],
                    help="probe L2 grid (ours penalises l2/2·|W|², the reference wd·|W|²: these are its 1e-5..1e-2)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "recipe_vs_plain")
    ap.add_argument("--json", type=Path, default=None, help="result JSON (default OUT/recipe_vs_plain.json)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of our training config")
    args = ap.parse_args(argv)
    if args.paired:
        if args.device != "cpu" or len(os.sched_getaffinity(0)) < 2:
            ap.error("--paired needs --device cpu and 2 CPUs")
        args.throughput_only, args.threads = True, 1

    from igpt.pretrain.config import load_config
    from igpt.pretrain.train import resolve_model_section
    from igpt.data_pipeline.manifest import Manifest

    args.out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, [f"data.dir={args.data}", f"train.device={args.device}", *args.overrides])
    resolve_model_section(cfg, Manifest.load(args.data))
    t = cfg.train
    steps = max(1, int(args.tokens // cfg.tokens_per_step()))
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or _torch_threads()
    env = {**single_process_env(),  # each side is a plain single process, with the same intra-op threads
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu"),
           "OMP_NUM_THREADS": str(threads)}
    results: dict = {"device": args.device, "tokens": args.tokens, "steps": steps, "config": args.config,
                     "overrides": args.overrides, "shape": {k: getattr(cfg.model, k) for k in ("n_layer", "n_embd", "n_head", "n_ctx")},
                     "precision": t.precision, "zero_stage": cfg.deepspeed.zero_stage, "omp_num_threads": threads,
                     "paired": args.paired}
    rounds = []
    for k in range(args.repeats):
        score = k == 0 and not args.throughput_only
        rounds.append(run_round(args, cfg, steps, args.out / f"round{k + 1}", env, score, reference_first=k % 2 == 1))
        print(f"round {k + 1}/{args.repeats}: " + ", ".join(
            f"{side} {r.get('loop_tokens_per_s', r['tokens_per_s']) / 1e3:.1f}k tokens/s" for side, r in rounds[-1].items()),
            flush=True)
    results.update(rounds[0])
    results["rounds"] = rounds
    if not args.skip_reference:
        results["ours_vs_plain"] = compare(rounds, equal_tokens=not args.reference_tokens)
    print(table(results))
    path = args.json or args.out / "recipe_vs_plain.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results, path)
    print(f"wrote {path}")
    return 0


def table(results: dict) -> str:
    """The side-by-side table of the first round (markdown), the ratio over the rounds and our loop's breakdown."""
    sides = [s for s in ("ours", "plain") if s in results]
    fmt = {"tokens/s, end to end": lambda r: f"{r.get('loop_tokens_per_s', r['tokens_per_s']) / 1e3:.1f}k",
           "tokens/s, logged training windows": lambda r: f"{r['tokens_per_s'] / 1e3:.1f}k",
           "val NLL (nats/token)": lambda r: f"{r['val_nll']:.4f}",
           "probe, best layer (val)": lambda r: "-" if r.get("probe_best_accuracy") is None else
           f"{100 * r['probe_best_accuracy']:.1f}% (layer {r['probe_best_layer']})"}
    lines = [f"| {results['device']}, {results['steps']} steps, {results['tokens']:.3g} tokens | " + " | ".join(sides) + " |",
             "|---|" + "---|" * len(sides)]
    lines += [f"| {name} | " + " | ".join(f(results[s]) for s in sides) + " |" for name, f in fmt.items()]
    if "ours_vs_plain" in results:
        v = results["ours_vs_plain"]
        low, high = v["tokens_per_s_range"]
        delta = f"; val NLL ours - plain: {v['val_nll_delta']:+.4f}" if "val_nll_delta" in v else \
            f" (the reference ran {results['plain']['tokens']:.3g} tokens: throughput only)"
        lines.append(f"ours / plain tokens/s, end to end: {v['tokens_per_s']:.3f}x median of {len(results['rounds'])} "
                     f"round(s), range {low:.3f}-{high:.3f}{delta}")
    wall = results["ours"]["wall_time"]
    lines.append(f"our loop, {wall['total']:.1f} s: " + " | ".join(
        f"{k} {100 * v / wall['total']:.1f}%" for k, v in wall.items() if k != "total") +
        f"; outside the step, validation/samples/checkpoints aside: {100 * results['ours']['outside_step_share']:.2f}%")
    return "\n".join(lines)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
