"""``igpt demo``: the whole pipeline on CIFAR-10 on embedded defaults, idempotent stage by stage.

palette (k-means 512) → token shards with a 10% validation split (and, with a margin, train shards
stored larger for random crops) → DeepSpeed pretraining for a bounded number of steps → export →
``eval nll`` / ``sample`` / ``probe --baselines`` on the exact-size shards → a summary with the
quality bar (the probe beats raw pixels by RAW_PIXELS_MARGIN and a random network; its best L2 is
interior to the widened grid; bits/pixel well below 9).
Every stage is skipped when its output is already complete, so a rerun continues where it stopped.

CIFAR-10 comes from ``--source``, else ``../shared/data/cifar10-train`` beside the checkout, else the
cache (``--data-cache``), else the official binary archive, downloaded, md5-checked and converted
into the cache (``igpt.data_pipeline.cifar10``). The console gets a few dozen lines: the training log is
kept whole in ``RUN_DIR/train.log`` and thinned on screen, Ray Tune's tables only with ``--verbose``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

from igpt import CHECKOUT
from igpt.data_pipeline.io import write_text_atomic
from igpt.errors import UserError
from igpt.evals.config import DEFAULT_L2
from igpt.evals.summaries import NllSummary, ProbeSummary, SampleSummary, Summary
from igpt.pretrain.config_files import packaged_config
from igpt.pretrain.wall_time import read_wall_time

# The first local copy looked for: ../shared beside a source checkout (none from a wheel install).
CIFAR_DIR = None if CHECKOUT is None else CHECKOUT.parent / "shared" / "data" / "cifar10-train"
CIFAR_CLASSES = "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"
STEP_LINE = re.compile(r"^step\s+(\d+)/(\d+) \|")  # the training's per-window log line
SHOWN_STEP_LINES = 8  # of them on screen; all are in RUN_DIR/train.log
CHECKPOINT_LINE = re.compile(r"^checkpoint \S+ \(")  # only in the log (with --verbose on screen too)
EXPERIMENT = "igpt-demo"  # the MLflow experiment of the training and the evals
TRAINING_VIEW = "workflowType=machine_learning"  # MLflow 3's UI opens on its GenAI side without it
RAW_PIXELS_MARGIN = 0.03  # the probe must beat raw pixels by 3 points (issue 16)


class StageFailed(RuntimeError):
    """A stage's child process failed; its output is on screen and in its log."""


@dataclass(frozen=True)
class DemoSettings:
    """The embedded defaults of the main job (sized for ≤ 10 training minutes on 2 CPU cores)."""

    workdir: str = "runs/demo"
    source: str | None = None  # raw-image CIFAR-10 tars; None: found or downloaded (resolve_source)
    resolution: int = 16
    margin: int = 0  # train images stored this much larger for random crops (the train config's data.random_crop)
    val_fraction: float = 0.1
    limit: int | None = None  # only the first N images (the shortened job in tests)
    train_config: str = packaged_config("cifar10-demo.yaml")
    train_overrides: tuple[str, ...] = ()
    eval_limit: int | None = 5000  # images per split for nll and the probes
    probe_layers: str = "1,2,3,4"  # igpt-mini's blocks 1-3 and its final-norm output (block 0 probes worst)
    probe_concat: bool = True  # also probe the probe layers concatenated
    probe_l2: str = json.dumps(list(DEFAULT_L2), separators=(",", ":"))  # the initial grid; it widens past an edge
    verbose: bool = False  # every training log line and Ray Tune's tables
    beside: str | None = None  # another demo's workdir whose figures the report shows beside these when it has run


@dataclass(frozen=True)
class DataOptions:
    """Where CIFAR-10 comes from when no ``--source`` is given (see the module docstring)."""

    cache: str | None = None  # default: igpt.data_pipeline.cifar10.default_cache_dir()
    url: str | None = None  # given: download from here even when a local copy exists
    md5: str | None = None  # default: the official archive's


def resolve_source(data: DataOptions) -> str:
    """Raw-image CIFAR-10 tars: ``../shared``'s copy unless a URL is given, else the cached or downloaded one."""
    from igpt.data_pipeline.cifar10 import MD5, URL, DownloadError, default_cache_dir, ensure_cifar10

    if data.url is None and CIFAR_DIR is not None and CIFAR_DIR.is_dir():
        _log(f"data: CIFAR-10 from {CIFAR_DIR}")
        return str(CIFAR_DIR / "cifar10-train-{000000..000009}.tar")  # as before: earlier shards stay reusable
    cache = data.cache or default_cache_dir()
    try:
        return ensure_cifar10(cache, data.url or URL, data.md5 or MD5, log=_log)
    except DownloadError as e:
        raise DownloadError(f"{e}. To use CIFAR-10 you already have, point --source at its raw-image tars "
                            "(e.g. --source 'DIR/cifar10-train-*.tar'), --data-url at the archive "
                            "(file:///PATH/cifar-10-binary.tar.gz) or --data-cache at a converted copy") from e


GPU_RECIPE = dict(workdir="runs/demo-gpu", resolution=32, margin=4,
                  train_config=packaged_config("cifar10-gpu-recipe.yaml"), eval_limit=None,
                  probe_layers="4,5,6,7,8,9", probe_concat=True)
# The patch model (``--model vit``, igpt.pretrain.patch_model) at 32x32 beside pixel iGPT, per recipe.
VIT = {"cpu": dict(workdir="runs/demo-vit", resolution=32, train_config=packaged_config("cifar10-demo-vit.yaml"),
                   beside=DemoSettings.workdir),
       "gpu": dict(workdir="runs/demo-gpu-vit", train_config=packaged_config("cifar10-gpu-vit.yaml"),
                   beside=GPU_RECIPE["workdir"])}
QUICK = dict(limit=2000, train_overrides=("train.steps=12", "train.val_every=6", "train.sample_every=12",
                                          "checkpoint.every=6", "train.log_every=3"),
             eval_limit=400, probe_layers="mid", probe_concat=False, probe_l2="[0.01,1.0]")


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def palette_stage(s: DemoSettings, work: Path) -> Path:
    """k-means 512 palette fitted on the source images (kept if present)."""
    from igpt.data_pipeline.fit import fit_palette_from_sources
    from igpt.data_pipeline.palette import PALETTE_FILE, save_palette

    path = work / PALETTE_FILE
    if path.is_file():
        _log(f"palette: reusing {path}")
        return path
    _log("palette: k-means with k=512 on sampled pixels")
    palette = fit_palette_from_sources([s.source], resolution=s.resolution, max_images=10000 if s.limit is None
                                       else min(s.limit, 10000))
    save_palette(palette, path)
    return path


def shard_stage(s: DemoSettings, work: Path, palette: Path) -> tuple[Path, Path]:
    """Token shards with a deterministic validation split at 32×32 and, if it differs, at the training
    resolution, plus with a margin the same split with the train images stored larger (val exact); returns
    (the shards to train on, the exact-size shards the evals read). The sharder itself resumes."""
    from igpt.data_pipeline.shard import shard_dataset

    dirs = {f"tokens{r}": (r, 0) for r in sorted({32, s.resolution})}
    if s.margin:
        dirs[f"tokens{s.resolution}m{s.margin}"] = (s.resolution, s.margin)
    for name, (r, margin) in dirs.items():
        m = shard_dataset([s.source], work / name, palette, resolution=r, val_fraction=s.val_fraction, shard_size=1000,
                          limit=s.limit, class_names=CIFAR_CLASSES.split(","), margin=margin)
    counts = ", ".join(f"{v.num_samples:,} {k}" for k, v in m.splits.items())
    _log(f"shards: {' and '.join(dirs)} in {work} ({counts} images each)")
    exact = work / f"tokens{s.resolution}"
    return (work / f"tokens{s.resolution}m{s.margin}" if s.margin else exact), exact


def _relay(cmd: list[str], log_path: Path, env: dict[str, str], verbose: bool) -> int:
    """Run ``cmd``, writing its output whole to ``log_path`` and to stderr thinned: of the per-step training
    lines only SHOWN_STEP_LINES evenly spaced ones, no checkpoint lines (every line with ``verbose``).
    Returns the exit code."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, env=env) as proc:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            m = STEP_LINE.match(line)
            shown = _shown(int(m.group(1)), int(m.group(2))) if m else not CHECKPOINT_LINE.match(line)
            if verbose or shown:
                sys.stderr.write(line)
                sys.stderr.flush()
    return proc.returncode


def _shown(step: int, total: int) -> bool:
    return step == total or step % max(1, total // SHOWN_STEP_LINES) == 0


def train_stage(s: DemoSettings, work: Path, data: Path, tracking_uri: str) -> Path:
    """DeepSpeed pretraining in a child process (resumes from its newest checkpoint) and the export."""
    import torch

    from igpt.pretrain.config import load_config
    from igpt.pretrain.release import WEIGHTS_FILE

    run_dir = work / "run"
    release = work / "release"
    if (release / WEIGHTS_FILE).is_file():
        _log(f"train: reusing {release}")
        return release
    overrides = [f"data.dir={data}", f"train.run_dir={run_dir}", f"logging.tracking_uri={tracking_uri}",
                 f"logging.experiment={EXPERIMENT}", *s.train_overrides]
    cfg = load_config(s.train_config, overrides)  # a bad key fails here, before a process is started
    cmd = [sys.executable, "-m", "igpt.pretrain.cli", "train", s.train_config, *overrides, "--resume", "auto"]
    log = run_dir / "train.log"
    _log(f"train: {cfg.train.steps} steps of {Path(s.train_config).name}; full log in {log}")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise look for CUDA
    code = _relay(cmd, log, env, s.verbose)
    if code:
        hint = "; rerun to resume" if code == cfg.checkpoint.preempt_exit_code else ""
        raise StageFailed(f"training exited with code {code} (log: {log}){hint}")
    export = [sys.executable, "-m", "igpt.pretrain.cli", "export", str(run_dir), "--out", str(release)]
    done = subprocess.run(export, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout + done.stderr)
        raise StageFailed(f"export exited with code {done.returncode}")
    _log(f"export: {release}")
    return release


@dataclass(frozen=True)
class EvalResults:
    """The demo's evals, each run or read back from its cached summary.json."""

    nll: NllSummary
    sample: SampleSummary | None  # None for a model without a likelihood (a patch model's pixels target)
    probe: ProbeSummary

    def briefs(self) -> dict[str, dict[str, Any]]:
        """Each eval's summary without its confusion matrix, by eval name."""
        return {f.name: getattr(self, f.name).brief() for f in fields(self) if getattr(self, f.name) is not None}


def eval_stage(s: DemoSettings, work: Path, data: Path, release: Path, tracking_uri: str,
               sample: bool = True) -> EvalResults:
    """nll, completions (unless not ``sample``) and probes with baselines, each cached as its summary.json."""
    from igpt.evals.commands import run_nll, run_probe, run_sample
    from igpt.evals.config import EvalRun, ProbeOptions, SampleOptions, SplitOptions, load_search_config

    def run(name: str) -> EvalRun:
        return EvalRun(checkpoint=str(release), data=str(data), out=str(work / "evals" / name),
                       limit=s.eval_limit, tracking_uri=tracking_uri, experiment=EXPERIMENT, run_name=name,
                       verbose=s.verbose)

    jobs: dict[str, tuple[type[Summary], Callable[[], Summary]]] = {
        "nll": (NllSummary, lambda: run_nll(run("nll"))),
        "sample": (SampleSummary, lambda: run_sample(run("sample"), SampleOptions())),
        "probe": (ProbeSummary, lambda: run_probe(
            run("probe"), SplitOptions(), ProbeOptions(layers=s.probe_layers, concat=s.probe_concat, baselines=True),
            load_search_config(None, [f"probe.l2={s.probe_l2}"]))),
    }
    results: dict[str, Summary | None] = {"sample": None}
    if not sample:
        del jobs["sample"]
    for name, (kind, job) in jobs.items():
        summary = work / "evals" / name / "summary.json"
        if summary.is_file():
            _log(f"eval {name}: reusing {summary}")
            results[name] = kind.from_dict(json.loads(summary.read_text()))
        else:
            _log(f"eval {name}")
            results[name] = job()
    return EvalResults(**results)


@dataclass(frozen=True)
class QualityBar:
    """The checks the demo must pass (the booleans), with the numbers behind them."""

    probe_accuracy: float
    probe_features: int | str  # the best probe's layer, or the label of the concatenated layers
    probe_l2: float
    probe_l2_searched: list[float]
    raw_pixels_accuracy: float
    random_init_accuracy: float
    val_loss: float  # bits per pixel, or a patch model's pixels target's MSE (``val_loss_unit``)
    val_loss_unit: str  # "bits/pixel" or "MSE"
    untrained_loss: float  # the same for the untrained (zero-head) model
    beats_raw_pixels: bool
    probe_l2_interior: bool
    beats_random_init: bool
    loss_well_below_untrained: bool


def quality_bar(results: EvalResults, patch_size: int) -> QualityBar:
    """The quality bar of the evals' results: bits/pixel 3 below the untrained 9, or an MSE under 3/4 of the
    untrained model's (which predicts zeros: (n-1)/n for n normalised values per patch)."""
    probe = results.probe
    base = probe.baselines
    nll = results.nll
    if nll.bits_per_pixel is not None:
        unit, loss, untrained = "bits/pixel", nll.bits_per_pixel, math.log2(512)
        well_below = loss < untrained - 3.0
    else:
        values = 3 * patch_size ** 2
        unit, loss, untrained = "MSE", nll.mse, (values - 1) / values
        well_below = loss < 0.75 * untrained
    best = probe.per_layer[str(probe.best.layer)]
    return QualityBar(
        probe_accuracy=probe.accuracy,
        probe_features=probe.best.layer,
        probe_l2=probe.best.l2,
        probe_l2_searched=best.l2_searched,
        raw_pixels_accuracy=base["raw_pixels"].accuracy,
        random_init_accuracy=base["random_init"].accuracy,
        val_loss=loss,
        val_loss_unit=unit,
        untrained_loss=untrained,
        beats_raw_pixels=probe.accuracy >= base["raw_pixels"].accuracy + RAW_PIXELS_MARGIN,
        probe_l2_interior=not best.l2_at_edge,
        beats_random_init=probe.accuracy > base["random_init"].accuracy,
        loss_well_below_untrained=well_below,
    )


def run_demo(s: DemoSettings, cifar: DataOptions = DataOptions()) -> dict[str, Any]:
    """Run every stage (reusing finished ones); write and return the summary."""
    from igpt.pretrain.config import load_config

    work = Path(s.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if s.source is None:
        s = replace(s, source=resolve_source(cifar))
    db = work / "mlflow.db"
    tracking_uri = f"sqlite:///{db}"
    palette = palette_stage(s, work)
    train_data, data = shard_stage(s, work, palette)
    release = train_stage(s, work, train_data, tracking_uri)
    model = load_config(s.train_config, [f"data.dir={train_data}", *s.train_overrides]).model
    results = eval_stage(s, work, data, release, tracking_uri, sample=model.likelihood)
    summary = {
        "settings": asdict(s),
        "quality_bar": asdict(quality_bar(results, model.patch_size)),
        "training": training_summary(work / "run" / "train.log", model.unit),
        "artifacts": {
            "palette": str(palette), "token_shards": str(train_data), "run_dir": str(work / "run"),
            "release": str(release), **(results.sample.files if results.sample else {}),
            "probe_per_layer_plot": str(work / "evals" / "probe" / "probe_accuracy_per_layer.png"),
        },
        "mlflow_ui": f"mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1",
        "mlflow_url": f"http://127.0.0.1:5000/#/experiments/{_experiment_id(tracking_uri)}?{TRAINING_VIEW}",
        "evals": results.briefs(),
    }
    if s.beside is not None and (Path(s.beside) / "summary.json").is_file():
        other = json.loads((Path(s.beside) / "summary.json").read_text())
        summary["beside"] = {"workdir": str(Path(s.beside).resolve()), "quality_bar": other["quality_bar"],
                             "training": other.get("training")}
    write_text_atomic(json.dumps(summary, indent=2), work / "summary.json")
    return summary


def training_summary(log: Path, unit: str) -> dict[str, Any]:
    """The unit trained and the training's wall time from its log's last ``wall time`` line (None without one):
    ``loop_seconds`` leaves out validation, samples and checkpoints."""
    wall = read_wall_time(log.read_text()) if log.is_file() else None
    return {"unit": unit, "wall_seconds": wall and wall["total"], "loop_seconds": wall and wall["loop"]}


def _experiment_id(tracking_uri: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(EXPERIMENT).experiment_id


def format_report(summary: dict[str, Any], judged: bool = True) -> str:
    """The few lines a person reads at the end of the job. Not ``judged`` (a quick run, too short to meet
    the quality bar), the checks show their figures but neither PASS nor FAIL."""
    q = QualityBar(**summary["quality_bar"])

    def mark(ok: bool) -> str:
        return ("PASS" if ok else "FAIL") if judged else "not judged: quick run"

    work = Path(summary["artifacts"]["run_dir"]).parent
    rel = {k: os.path.relpath(v, work) for k, v in summary["artifacts"].items()}
    lines = [
        "iGPT demo on CIFAR-10 — summary",
        f"  validation {q.val_loss_unit}: {q.val_loss:.3f} (untrained: {q.untrained_loss:.{1 if q.val_loss_unit != 'MSE' else 3}f})"
        f"  [{mark(q.loss_well_below_untrained)}]",
        f"  linear probe accuracy: {q.probe_accuracy:.3f} (layer {q.probe_features}, L2 {q.probe_l2:g}, "
        f"{'inside' if q.probe_l2_interior else 'at an edge of'} {_span(q.probe_l2_searched)})"
        f"  [{mark(q.probe_l2_interior)}]",
        f"    vs raw pixels:       {q.raw_pixels_accuracy:.3f}  ({100 * (q.probe_accuracy - q.raw_pixels_accuracy):+.1f}"
        f" points, bar +{100 * RAW_PIXELS_MARGIN:g})  [{mark(q.beats_raw_pixels)}]",
        f"    vs random network:   {q.random_init_accuracy:.3f}  [{mark(q.beats_random_init)}]",
        *_beside_lines(summary, q),
        f"  artifacts in {work}:",
        f"    {rel.pop('palette')}, {rel.pop('token_shards')}/, {rel.pop('run_dir')}/ (train.log, checkpoints), "
        f"{rel.pop('release')}/",
        *[f"    {k}: {v}" for k, v in rel.items()],
        f"  open MLflow: {summary['mlflow_ui']}",
        f"    then {summary['mlflow_url']} (the training runs, evals with their trials nested)",
    ]
    return "\n".join(lines)


def _beside_lines(summary: dict[str, Any], q: QualityBar) -> list[str]:
    """The other demo's figures (``DemoSettings.beside``) next to this one's, when it had run."""
    other = summary.get("beside")
    if other is None:
        return []
    b = QualityBar(**other["quality_bar"])

    def seconds(training: dict[str, Any] | None) -> str:
        loop = (training or {}).get("loop_seconds")
        return "?" if loop is None else f"{loop:.0f} s"

    return [f"  beside the {(other['training'] or {}).get('unit', 'other')} demo in {other['workdir']}:",
            f"    its linear probe:    {b.probe_accuracy:.3f}  (this one {100 * (q.probe_accuracy - b.probe_accuracy):+.1f}"
            f" points)",
            f"    its validation {b.val_loss_unit}: {b.val_loss:.3f}",
            f"    training loop:       {seconds(other['training'])} (this one {seconds(summary.get('training'))})"]


def _span(grid: list[float]) -> str:
    return f"the {len(grid)} L2 values {grid[0]:g}..{grid[-1]:g} searched"


RECIPES = {"cpu": {}, "gpu": GPU_RECIPE}


def _cmd_demo(args: argparse.Namespace) -> int:
    s = replace(DemoSettings(), **RECIPES[args.recipe])
    if args.model == "vit":
        s = replace(s, **VIT[args.recipe])
    if args.quick:
        s = replace(s, **QUICK)
    given = {"workdir": args.workdir, "source": args.source, "resolution": args.resolution}
    s = replace(s, verbose=args.verbose, **{k: v for k, v in given.items() if v is not None})
    if s.resolution < 1:
        raise UserError(f"--resolution must be positive, got {s.resolution}")
    try:
        summary = run_demo(s, DataOptions(cache=args.data_cache, url=args.data_url, md5=args.data_md5))
    except StageFailed as e:
        print(f"igpt demo: error: {e}", file=sys.stderr)
        return 1
    print(format_report(summary, judged=not args.quick))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo`` (the main job) to the ``igpt`` command."""
    p = subparsers.add_parser("demo", help="the whole pipeline on CIFAR-10 (palette → shards → train → evals)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="cpu",
                   help="cpu: ~10 training minutes on 2 cores at 16x16; gpu: ~6 minutes on one GPU at 32x32")
    p.add_argument("--model", choices=["pixel", "vit"], default="pixel",
                   help="pixel: iGPT, one token per pixel; vit: the patch model (4x4 patches at 32x32, raster order, "
                        "regressing the next patch's normalised colours)")
    p.add_argument("--workdir", default=None,
                   help="where every stage writes (rerun to resume; default runs/demo[-gpu][-vit])")
    p.add_argument("--source", default=None,
                   help="local raw-image CIFAR-10 WebDataset tars, e.g. 'DIR/cifar10-train-*.tar' (default: "
                        "../shared/data/cifar10-train if present, else downloaded into --data-cache)")
    p.add_argument("--data-cache", default=None,
                   help="where the downloaded CIFAR-10 is converted and kept (default ~/.cache/igpt/cifar10)")
    p.add_argument("--data-url", default=os.environ.get("IGPT_CIFAR10_URL"),
                   help="download the CIFAR-10 binary archive from here, even if a local copy exists "
                        "(default $IGPT_CIFAR10_URL, else the official URL when no local copy is found)")
    p.add_argument("--data-md5", default=os.environ.get("IGPT_CIFAR10_MD5"),
                   help="md5 the archive must have (default $IGPT_CIFAR10_MD5, else the official archive's)")
    p.add_argument("--quick", action="store_true", help="a shortened job (2,000 images, a few steps) for smoke tests; its quality bar is not judged")
    p.add_argument("--resolution", type=int, default=None, help="training image side in pixels")
    p.add_argument("--verbose", action="store_true", help="every training log line and Ray Tune's status tables")
    p.set_defaults(func=_cmd_demo)
