"""`igpt eval nll|sample|probe|finetune`: evals of a release dir or a training run dir on token shards.

Bad inputs (checkpoint, shards, splits, layers, search config) raise ValueError / FileNotFoundError, which
the `igpt` entry point reports as one line with exit code 2."""
from __future__ import annotations

import argparse

from igpt.evals.config import load_search_config


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="release dir or training run dir")
    p.add_argument("--data", required=True, help="token-shard dir (with manifest.json)")
    p.add_argument("--out", default="eval_out", help="output dir (PNGs, summary.json, caches, default MLflow store)")
    p.add_argument("--device", default="auto", help="auto (GPU when present) | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples of each split")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in --out)")
    p.add_argument("--experiment", default="igpt-eval", help="MLflow experiment name")
    p.add_argument("--run-name", default=None, help="MLflow parent run name")


def _tuned(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--search", default=None, help="YAML search config (see evals/config.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a search-config key, e.g. probe.l2=[0.01,0.1] or resources.gpus_per_trial=1")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--cpus-per-trial", type=float, default=None)
    p.add_argument("--gpus-per-trial", type=float, default=None)
    p.add_argument("--verbose", action="store_true", help="show Ray Tune's status tables and log lines")


def _run(args: argparse.Namespace):
    from igpt.evals.commands import EvalRun

    return EvalRun(checkpoint=args.checkpoint, data=args.data, out=args.out, device=args.device,
                   batch_size=args.batch_size, limit=args.limit, tracking_uri=args.tracking_uri,
                   experiment=args.experiment, run_name=args.run_name, verbose=getattr(args, "verbose", False))


def _search(args: argparse.Namespace):
    cfg = load_search_config(args.search, args.overrides)
    if args.ray_address is not None:
        cfg.resources.address = args.ray_address
    if args.cpus_per_trial is not None:
        cfg.resources.cpus_per_trial = args.cpus_per_trial
    if args.gpus_per_trial is not None:
        cfg.resources.gpus_per_trial = args.gpus_per_trial
    return cfg


def _splits(args: argparse.Namespace):
    from igpt.evals.commands import SplitOptions

    return SplitOptions(args.train_split, args.val_split, getattr(args, "test_split", None),
                        getattr(args, "test_data", None))


def _report(summary: dict) -> int:
    from igpt.evals.commands import format_summary

    print(format_summary(summary))
    return 0


def cmd_nll(args: argparse.Namespace) -> int:
    from igpt.evals.commands import run_nll

    return _report(run_nll(_run(args), args.split))


def cmd_sample(args: argparse.Namespace) -> int:
    from igpt.evals.commands import SampleOptions, run_sample

    opt = SampleOptions(split=args.split, num_samples=args.num_samples, num_images=args.num_images,
                        per_image=args.per_image, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                        scale=args.scale, cols=args.cols)
    return _report(run_sample(_run(args), opt))


def cmd_probe(args: argparse.Namespace) -> int:
    from igpt.evals.commands import run_probe

    return _report(run_probe(_run(args), _splits(args), args.layers, _search(args), args.cache_dir, args.baselines,
                             args.concat))


def cmd_finetune(args: argparse.Namespace) -> int:
    from igpt.evals.commands import run_finetune

    return _report(run_finetune(_run(args), _splits(args), _search(args)))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` with its four sub-subcommands."""
    ev = subparsers.add_parser("eval", help="evaluate a checkpoint: nll | sample | probe | finetune")
    sub = ev.add_subparsers(dest="eval_command", required=True)

    p = sub.add_parser("nll", help="nats/token and bits/pixel on a split, with a 95%% interval")
    _common(p)
    p.add_argument("--split", default="val")
    p.set_defaults(func=cmd_nll)

    p = sub.add_parser("sample", help="unconditional samples and bottom-half completions as PNG grids")
    _common(p)
    p.add_argument("--split", default="val", help="split whose images are completed")
    p.add_argument("--num-samples", type=int, default=16, help="unconditional samples")
    p.add_argument("--num-images", type=int, default=8, help="real images whose bottom half is completed")
    p.add_argument("--per-image", type=int, default=3, help="completions per image")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4, help="integer upscaling of each image in the grid")
    p.add_argument("--cols", type=int, default=8, help="images per row of the unconditional grid")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("probe", help="linear probes (layers x L2, the L2 grid widened past an edge) with Ray Tune")
    _common(p)
    _tuned(p)
    p.add_argument("--layers", default="mid", help="'all', 'mid' or comma-separated block indices")
    p.add_argument("--concat", action="store_true",
                   help="also probe the concatenation of the layers' pooled states (e.g. --layers 6,7,8 --concat)")
    p.add_argument("--test-split", default=None, help="report accuracy here (else on the validation split)")
    p.add_argument("--test-data", default=None, help="shard dir of --test-split when not --data")
    p.add_argument("--cache-dir", default=None, help="feature cache (default: OUT/feature_cache)")
    p.add_argument("--baselines", action="store_true",
                   help="also probe raw pixels and a randomly initialised model of the same shape")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("finetune", help="fine-tune with L_clf + lambda*L_gen (lr x lambda x epochs, ASHA)")
    _common(p)
    _tuned(p)
    p.set_defaults(func=cmd_finetune)
