"""Patch tokens beside pixel iGPT on CPU, each trained for the pixel demo's wall time (``benchmarks/results/vit.md``).

    python benchmarks/vit.py --out runs/vit-series                 # about 70 minutes on 2 CPU cores
    python benchmarks/vit.py --out runs/vit-smoke --quick          # the same series shortened (the plumbing)

1. The pixel row is ``igpt demo`` as it runs (16x16, ``configs/cifar10-demo.yaml``) in OUT/pixel: its palette,
   its 16x16 and 32x32 shards, training, evals, and the probe's baselines at 16x16 (raw pixels, a random network).
2. Each patch row trains ``configs/cifar10-demo-vit.yaml`` with its order and target on the demo's 32x32 shards
   for the pixel row's training wall time: a short calibration run of the same config measures its steady seconds
   per step, and ``train.steps`` is the pixel row's loop seconds over that. Then export, ``eval nll`` and ``eval
   probe`` with the demo's protocol (see ``PROBE``), the first patch row with the baselines at 32x32.
3. The yardstick, ``plain_patch.py`` (``--reference``, beside the checkout), raster and random order, on the same
   32x32 shards for the pixel row's loop seconds, probed on the same 5,000 probe-training images with its own
   protocol (per layer, L2 picked on the last 10% of them, the best layer on its full val split). Our rows report
   their best single layer beside the concatenation for that comparison.
4. Fine-tuning, 5,000 images per split as the probes: the best patch row's release, and the same architecture from
   a random initialisation trained on labels only (the supervised ViT).

Throughput is images (and pixels, images x R²) per second over each run's training loop less validation,
samples and checkpoints (``igpt.pretrain.wall_time``). Every stage keeps its output: a rerun with the same OUT
reuses what finished. Writes OUT/vit.json (or --json) and prints the markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # igpt and the sibling logged_run, also under PYTHONSAFEPATH

from igpt.data_pipeline.io import write_json_atomic  # noqa: E402
from logged_run import run_logged  # noqa: E402
from igpt.pretrain.distributed import single_process_env  # noqa: E402
from igpt.pretrain.wall_time import read_wall_time  # noqa: E402

PROBE_LIMIT = 5000  # probe-training images (and val images scored), the demo's eval_limit
PROBE = ["probe.l2=[1e-5,1e-4,1e-3,1e-2,1e-1]"]  # the demo's grid; widened past an edge (probe.widen)
PROBE_LAYERS = "1,2,3,4"  # igpt-mini's blocks 1-3 and the final norm, and their concatenation (the demo's)
FINETUNE = ["finetune.lr=[3e-4,1e-3]", "finetune.lam=[0.0]", "finetune.epochs=[6]", "resources.num_cpus=2"]


@dataclass(frozen=True)
class PatchRow:
    """One patch configuration of the series: ``configs/cifar10-demo-vit.yaml`` with these overrides."""

    name: str
    order: str
    target: str
    patch_size: int = 4

    @property
    def overrides(self) -> list[str]:
        return [f"model.order={self.order}", f"model.target={self.target}", f"model.patch_size={self.patch_size}"]


ROWS = [PatchRow("patch-raster-pixels", "raster", "pixels"), PatchRow("patch-random-pixels", "random", "pixels"),
        PatchRow("patch-raster-tokens", "raster", "tokens"), PatchRow("patch-random-tokens", "random", "tokens")]
QUICK_DEMO = ["--quick"]


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    run_logged(cmd, log, REPO, env)


def wall_time(log: Path) -> dict[str, float]:
    """The breakdown of the last ``wall time`` line in a training log (``read_wall_time``)."""
    found = read_wall_time(log.read_text())
    if found is None:
        raise SystemExit(f"no 'wall time' line in {log}")
    return found


def throughput(log: Path, steps: int, batch: int, resolution: int) -> dict[str, float]:
    """Training seconds and images/s and pixels/s over the loop of the run that wrote ``log``."""
    wall = wall_time(log)
    images_per_s = steps * batch / wall["loop"]
    return {"steps": steps, "batch": batch, "loop_s": wall["loop"], "total_s": wall["total"],
            "images_per_s": images_per_s, "pixels_per_s": images_per_s * resolution ** 2, "wall_time": wall}


def pixel_row(args: argparse.Namespace, env: dict[str, str]) -> dict:
    """``igpt demo`` in OUT/pixel (reused when its summary exists) and its figures."""
    work = args.out / "pixel"
    summary_path = work / "summary.json"
    if not summary_path.is_file():
        cmd = [sys.executable, "-m", "igpt", "demo", "--workdir", str(work)]
        cmd += (["--source", args.source] if args.source else []) + (QUICK_DEMO if args.quick else [])
        _run(cmd, args.out / "pixel.log", env)
    summary = json.loads(summary_path.read_text())
    from igpt.pretrain.config import load_config

    recorded = Path(summary["settings"]["train_config"])  # from the checkout that ran it, else the same name here
    config = recorded if recorded.is_file() else REPO / "configs" / recorded.name
    cfg = load_config(str(config), [f"data.dir={work / 'tokens16'}", *summary["settings"]["train_overrides"]])
    probe = summary["evals"]["probe"]
    from igpt.pretrain.release import load_model

    model, _, _ = load_model(work / "release")
    return {"name": "pixel", "resolution": summary["settings"]["resolution"], "params": model.num_params(),
            **throughput(work / "run" / "train.log", cfg.train.steps, cfg.global_batch(), summary["settings"]["resolution"]),
            "bits_per_pixel": summary["evals"]["nll"]["bits_per_pixel"], "mse": None,
            "probe": probe["accuracy"], "probe_layer": probe["best"]["layer"], "probe_l2": probe["best"]["l2"],
            "probe_single_layer": best_single_layer(probe),
            "baselines": {k: v["accuracy"] for k, v in probe["baselines"].items()}}


def train_patch(args: argparse.Namespace, row: PatchRow, data: Path, steps: int, run_dir: Path,
                extra: list[str], env: dict[str, str]) -> Path:
    """``igpt train`` of the demo-vit config as ``row`` for ``steps``; the training log."""
    log = run_dir / "train.log"
    if not (run_dir / "done").is_file():
        cmd = [sys.executable, "-m", "igpt.pretrain.cli", "train", str(args.config), f"data.dir={data}",
               f"train.run_dir={run_dir}", f"train.steps={steps}", "logging.backend=jsonl", *row.overrides, *extra]
        _run(cmd, log, env)
        (run_dir / "done").write_text(str(steps))
    return log


def seconds_per_step(run_dir: Path, tokens_per_step: int) -> float:
    """The steady seconds per step of a calibration run: its logged training windows after the first (which
    holds the start-up), as the rest of a long run goes."""
    from igpt.pretrain.tracking import METRICS_FILE, read_metrics, training_windows

    windows = training_windows(read_metrics(run_dir / "tracking" / METRICS_FILE), tokens_per_step)
    steady = windows[1:] or windows
    return sum(seconds for _, seconds in steady) / sum(steps for steps, _ in steady)


def patch_row(args: argparse.Namespace, row: PatchRow, data: Path, loop_s: float, baselines: bool,
              env: dict[str, str]) -> dict:
    """Calibrate, train for ``loop_s`` seconds of loop, export, nll and probe one patch configuration."""
    from igpt.data_pipeline.manifest import Manifest
    from igpt.pretrain.config import load_config
    from igpt.pretrain.train import resolve_model_section

    work = args.out / row.name
    cfg = load_config(str(args.config), [f"data.dir={data}", *row.overrides])
    resolve_model_section(cfg, Manifest.load(data))
    train_patch(args, row, data, args.calibration_steps, work / "calibration",
                [f"train.val_every={10 ** 6}", f"checkpoint.every={10 ** 6}", f"train.sample_every={10 ** 6}",
                 f"train.log_every={max(1, args.calibration_steps // 8)}"], env)
    per_step = seconds_per_step(work / "calibration", cfg.tokens_per_step())
    steps = max(args.calibration_steps, round(loop_s / per_step))
    val_every = max(1, steps // 4)  # the demo's four validations and checkpoints
    log = train_patch(args, row, data, steps, work / "run",
                      [f"train.val_every={val_every}", f"checkpoint.every={val_every}", f"train.sample_every={steps}"],
                      env)
    release = work / "release"
    if not (release / "weights.pt").is_file() and not any(release.glob("*.safetensors")):
        _run([sys.executable, "-m", "igpt.pretrain.cli", "export", str(work / "run"), "--out", str(release)],
             work / "export.log", env)
    nll = _eval(args, "nll", release, data, work / "nll", [], env)
    probe = _eval(args, "probe", release, data, work / "probe",
                  ["--layers", PROBE_LAYERS, "--concat", *(["--baselines"] if baselines else []),
                   *[a for o in PROBE for a in ("--set", o)]], env)
    from igpt.pretrain.release import load_model

    model, _, _ = load_model(release)
    side = data_resolution(data)
    return {"name": row.name, "order": row.order, "target": row.target, "patch_size": row.patch_size,
            "resolution": side, "params": model.num_params(), "seconds_per_step_calibrated": per_step,
            **throughput(log, steps, cfg.global_batch(), side),
            "bits_per_pixel": nll.get("bits_per_pixel"), "mse": nll.get("mse"),
            "probe": probe["accuracy"], "probe_layer": probe["best"]["layer"], "probe_l2": probe["best"]["l2"],
            "probe_single_layer": best_single_layer(probe),
            "baselines": {k: v["accuracy"] for k, v in (probe.get("baselines") or {}).items()},
            "release": str(release)}


def yardstick_row(args: argparse.Namespace, order: str, data: Path, loop_s: float, env: dict[str, str]) -> dict:
    """``plain_patch.py`` in ``order`` on ``data`` for ``loop_s`` seconds of training and its probe on ``args.limit``
    probe-training images (reused when its JSON holds the probe); its figures as a row."""
    out = args.out / f"plain-patch-{order}.json"
    if "probe_best_val_accuracy" not in (json.loads(out.read_text()) if out.is_file() else {}):
        _run([sys.executable, str(args.reference), str(data), "--patch", "4", "--order", order,
              "--seconds", f"{loop_s:.0f}", "--probe-limit", str(args.limit), "--device", "cpu", "--out", str(out)],
             args.out / f"plain-patch-{order}.log", env)
    found = json.loads(out.read_text())
    return {"name": f"plain-patch-{order}", "order": order, "target": "tokens", "patch_size": 4,
            "resolution": found["resolution"], "params": found["params_M"] * 1e6, "steps": found["steps"],
            "batch": found["args"]["batch"], "loop_s": found["train_s"], "images_per_s": found["images_per_s"],
            "pixels_per_s": found["pixels_per_s"], "bits_per_pixel": found["val_bits_per_pixel_raster"], "mse": None,
            "probe": found["probe_best_val_accuracy"], "probe_layer": str(found["probe_best_layer"]),  # its numbering is ours
            "probe_single_layer": found["probe_best_val_accuracy"], "probe_protocol": "plain_patch.py's own",
            "baselines": {}}


def best_single_layer(probe: dict) -> float:
    """The best probe accuracy of one layer alone (not a concatenation) in an ``eval probe`` summary."""
    return max(r["val_acc"] for layer, r in probe["per_layer"].items() if "+" not in layer)


def data_resolution(data: Path) -> int:
    """The stored side of a token-shard directory."""
    from igpt.data_pipeline.manifest import Manifest

    return Manifest.load(data).stored_resolution("train")


def _eval(args: argparse.Namespace, name: str, release: Path, data: Path, out: Path, extra: list[str],
          env: dict[str, str]) -> dict:
    """``igpt eval NAME`` of ``release`` on ``data`` (reused when its summary exists); its summary."""
    summary = out / "summary.json"
    if not summary.is_file():
        cmd = [sys.executable, "-m", "igpt", "eval", name, "--checkpoint", str(release), "--data", str(data), "--out", str(out),
               "--limit", str(args.limit), "--tracking-uri", f"sqlite:///{args.out / 'mlflow.db'}", *extra]
        _run(cmd, out.parent / f"{name}.log", env)
    return json.loads(summary.read_text())


def finetune_rows(args: argparse.Namespace, best: dict, data: Path, env: dict[str, str]) -> dict[str, dict]:
    """Fine-tuning of the best patch row's release and of its architecture from a random init."""
    out = {}
    for init in ("pretrained", "random"):
        summary = _eval(args, "finetune", Path(best["release"]), data, args.out / f"finetune-{init}",
                        ["--init", init, *[a for o in FINETUNE for a in ("--set", o)]], env)
        out[init] = {"accuracy": summary["accuracy"], "best": summary["best"], "num_train": summary["num_train"]}
    return out


def table(results: dict) -> str:
    """The markdown table of ``results`` (rows, raw-pixel and random-network baselines, fine-tuning)."""
    ft = results.get("finetune", {})
    lines = ["| row | resolution | params | probe (val) | layer | best single layer | fine-tune (val) | bits/pixel | MSE | "
             "images/s | pixels/s | steps | training s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    best = results["best_patch_row"]
    for r in results["rows"] + results.get("yardsticks", []):
        tuned = ft.get("pretrained", {}).get("accuracy") if r["name"] == best else None
        cells = [r["name"], f"{r['resolution']}x{r['resolution']}", _fmt(r["params"], lambda v: f"{v / 1e6:.2f}M"),
                 f"{100 * r['probe']:.1f}%", str(r["probe_layer"]),
                 _fmt(r.get("probe_single_layer"), lambda v: f"{100 * v:.1f}%"), _fmt(tuned, lambda v: f"{100 * v:.1f}%"),
                 _fmt(r["bits_per_pixel"], lambda v: f"{v:.3f}"), _fmt(r["mse"], lambda v: f"{v:.4f}"),
                 f"{r['images_per_s']:.0f}", f"{r['pixels_per_s'] / 1e3:.0f}k", str(r["steps"]), f"{r['loop_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    pixel, patch = results["rows"][0], next(r for r in results["rows"] if r["name"] == best)
    for name, acc in (("raw pixels 16x16", pixel["baselines"].get("raw_pixels")),
                      ("random network, pixel iGPT", pixel["baselines"].get("random_init")),
                      ("raw pixels 32x32", patch["baselines"].get("raw_pixels")
                       or results["rows"][1]["baselines"].get("raw_pixels")),
                      ("random network, patch model", results["rows"][1]["baselines"].get("random_init"))):
        if acc is not None:
            lines.append(f"| {name} | | | {100 * acc:.1f}% | | | | | | | | | |")
    if "random" in ft:
        lines.append(f"| supervised ViT from scratch ({best}'s architecture) | 32x32 | | | | | "
                     f"{100 * ft['random']['accuracy']:.1f}% | | | | | | |")
    lines.append(f"\nbest patch row {best}: {100 * results['probe_gain_points']:+.1f} points of probe over the pixel row")
    for y in results.get("yardsticks", []):
        ours = next(r for r in results["rows"] if r["name"] == best)
        lines.append(f"{best} against {y['name']} (best single layer each): "
                     f"{100 * (ours['probe_single_layer'] - y['probe']):+.1f} points")
    return "\n".join(lines)


def _fmt(value: float | None, fmt: Callable[[float], str]) -> str:
    return "" if value is None else fmt(value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "vit-series")
    ap.add_argument("--source", default=None, help="raw-image CIFAR-10 tars (default: the demo's lookup)")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "cifar10-demo-vit.yaml")
    ap.add_argument("--calibration-steps", type=int, default=40)
    ap.add_argument("--limit", type=int, default=PROBE_LIMIT, help="images per split for nll, probes and fine-tuning")
    ap.add_argument("--rows", nargs="+", default=[r.name for r in ROWS], choices=[r.name for r in ROWS],
                    help="the patch rows to run, in this order (the first is probed with the baselines)")
    ap.add_argument("--reference", type=Path, default=REPO.parent / "shared" / "reference" / "plain_patch.py",
                    help="the plain-PyTorch patch yardstick, run in raster and random order (skipped when absent)")
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--quick", action="store_true", help="the demo's --quick and short runs (a smoke test)")
    ap.add_argument("--json", type=Path, default=None, help="result JSON (default OUT/vit.json)")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.limit, args.calibration_steps = min(args.limit, 400), min(args.calibration_steps, 4)
    env = {**single_process_env(), "DS_ACCELERATOR": "cpu"}
    t0 = time.perf_counter()
    pixel = pixel_row(args, env)
    print(f"pixel: probe {100 * pixel['probe']:.1f}%, {pixel['loop_s']:.0f} s of training loop", flush=True)
    data = args.out / "pixel" / "tokens32"
    rows = [pixel]
    by_name = {r.name: r for r in ROWS}
    for k, row in enumerate(by_name[name] for name in args.rows):  # in the order given
        rows.append(patch_row(args, row, data, pixel["loop_s"], baselines=k == 0, env=env))
        print(f"{row.name}: probe {100 * rows[-1]['probe']:.1f}%, {rows[-1]['steps']} steps, "
              f"{rows[-1]['loop_s']:.0f} s", flush=True)
    yardsticks = []
    if args.reference.is_file():
        for order in ("raster", "random"):
            yardsticks.append(yardstick_row(args, order, data, pixel["loop_s"], env))
            print(f"{yardsticks[-1]['name']}: probe {100 * yardsticks[-1]['probe']:.1f}%", flush=True)
    else:
        print(f"no yardstick: {args.reference} is absent", flush=True)
    best = max(rows[1:], key=lambda r: r["probe"])
    results = {"rows": rows, "yardsticks": yardsticks, "best_patch_row": best["name"],
               "probe_gain_points": best["probe"] - pixel["probe"],
               "limit": args.limit, "quick": args.quick, "probe_layers": PROBE_LAYERS, "probe_search": PROBE,
               "finetune_search": FINETUNE}
    path = args.json or args.out / "vit.json"
    for stage in ("probes", "finetune"):  # written after the probes, again after fine-tuning (the longest part)
        if stage == "finetune":
            if args.no_finetune:
                break
            results["finetune"] = finetune_rows(args, best, data, env)
        results["series_s"] = time.perf_counter() - t0
        write_json_atomic(results, path)
        print(table(results), f"\nwrote {path}", sep="\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
