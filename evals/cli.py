"""`igpt eval nll|sample|probe|finetune`: evals of a release dir or a training run dir on token shards.

Every option's default is its field's in ``igpt.evals.config`` (``_option``). Bad inputs (checkpoint, shards,
splits, layers, search config) raise ValueError / FileNotFoundError, which the `igpt` entry point reports as
one line with exit code 2."""
from __future__ import annotations

import argparse
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

from igpt.evals.config import (EvalRun, EvalSearchConfig, FinetuneOptions, NllOptions, ProbeOptions, SampleOptions,
                               SplitOptions,
                               field_default, load_search_config)
from igpt.pretrain.cli import add_trust_option

if TYPE_CHECKING:
    from igpt.evals.summaries import Summary

T = TypeVar("T")


def _option(p: argparse.ArgumentParser, schema: type, name: str, **kwargs: Any) -> None:
    """``--name`` (underscores as dashes) for ``schema``'s field ``name``, with that field's default."""
    p.add_argument("--" + name.replace("_", "-"), default=field_default(schema, name), **kwargs)


def _from_args(schema: type[T], args: argparse.Namespace) -> T:
    """``schema`` built from the parsed options named as its fields (those this subcommand has)."""
    return schema(**{f.name: getattr(args, f.name) for f in fields(schema) if hasattr(args, f.name)})


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="release dir or training run dir")
    p.add_argument("--data", required=True, help="token-shard dir (with manifest.json)")
    _option(p, EvalRun, "out", help="output dir (PNGs, summary.json, caches, default MLflow store)")
    _option(p, EvalRun, "device", help="auto (GPU when present) | cpu | cuda | cuda:N")
    _option(p, EvalRun, "batch_size", type=int)
    _option(p, EvalRun, "limit", type=int, help="use only the first N samples of each split")
    _option(p, EvalRun, "tracking_uri", help="MLflow tracking URI (default: sqlite in --out)")
    _option(p, EvalRun, "experiment", help="MLflow experiment name")
    _option(p, EvalRun, "run_name", help="MLflow parent run name")
    add_trust_option(p)


def _tuned(p: argparse.ArgumentParser) -> None:
    _option(p, SplitOptions, "train_split")
    _option(p, SplitOptions, "val_split")
    p.add_argument("--search", default=None, help="YAML search config (see evals/config.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a search-config key, e.g. probe.l2=[0.01,0.1] or resources.gpus_per_trial=1")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--cpus-per-trial", type=float, default=None)
    p.add_argument("--gpus-per-trial", type=float, default=None)
    _option(p, EvalRun, "verbose", action="store_true", help="show Ray Tune's status tables and log lines")


def _search(args: argparse.Namespace) -> EvalSearchConfig:
    cfg = load_search_config(args.search, args.overrides)
    if args.ray_address is not None:
        cfg.resources.address = args.ray_address
    if args.cpus_per_trial is not None:
        cfg.resources.cpus_per_trial = args.cpus_per_trial
    if args.gpus_per_trial is not None:
        cfg.resources.gpus_per_trial = args.gpus_per_trial
    return cfg


def _report(summary: Summary) -> int:
    from igpt.evals.commands import format_summary

    print(format_summary(summary))
    return 0


def cmd_nll(args: argparse.Namespace) -> int:
    from igpt.evals.commands import run_nll

    return _report(run_nll(_from_args(EvalRun, args), _from_args(NllOptions, args)))


def cmd_sample(args: argparse.Namespace) -> int:
    from igpt.evals.commands import run_sample

    return _report(run_sample(_from_args(EvalRun, args), _from_args(SampleOptions, args)))


def cmd_probe(args: argparse.Namespace) -> int:
    from igpt.evals.commands import run_probe

    return _report(run_probe(_from_args(EvalRun, args), _from_args(SplitOptions, args), _from_args(ProbeOptions, args),
                             _search(args)))


def cmd_finetune(args: argparse.Namespace) -> int:
    from igpt.evals.commands import run_finetune

    return _report(run_finetune(_from_args(EvalRun, args), _from_args(SplitOptions, args), _search(args),
                                _from_args(FinetuneOptions, args)))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` with its four sub-subcommands."""
    ev = subparsers.add_parser("eval", help="evaluate a checkpoint: nll | sample | probe | finetune")
    sub = ev.add_subparsers(dest="eval_command", required=True)

    p = sub.add_parser("nll", help="nats/token and bits/pixel on a split, with a 95%% interval")
    _common(p)
    _option(p, NllOptions, "split")
    p.set_defaults(func=cmd_nll)

    p = sub.add_parser("sample", help="unconditional samples and bottom-half completions as PNG grids")
    _common(p)
    _option(p, SampleOptions, "split", help="split whose images are completed")
    _option(p, SampleOptions, "num_samples", type=int, help="unconditional samples")
    _option(p, SampleOptions, "num_images", type=int, help="real images whose bottom half is completed")
    _option(p, SampleOptions, "per_image", type=int, help="completions per image")
    _option(p, SampleOptions, "temperature", type=float)
    _option(p, SampleOptions, "top_k", type=int)
    _option(p, SampleOptions, "seed", type=int)
    _option(p, SampleOptions, "scale", type=int, help="integer upscaling of each image in the grid")
    _option(p, SampleOptions, "cols", type=int, help="images per row of the unconditional grid")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("probe", help="linear probes (layers x L2, the L2 grid widened past an edge) with Ray Tune")
    _common(p)
    _tuned(p)
    _option(p, ProbeOptions, "layers", help="'all', 'mid' or comma-separated block indices")
    _option(p, ProbeOptions, "concat", action="store_true",
            help="also probe the concatenation of the layers' pooled states (e.g. --layers 6,7,8 --concat)")
    _option(p, SplitOptions, "test_split", help="report accuracy here (else on the validation split)")
    _option(p, SplitOptions, "test_data", help="shard dir of --test-split when not --data")
    _option(p, ProbeOptions, "cache_dir", help="feature cache (default: OUT/feature_cache)")
    _option(p, ProbeOptions, "baselines", action="store_true",
            help="also probe raw pixels and a randomly initialised model of the same shape")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("finetune", help="fine-tune with L_clf + lambda*L_gen (lr x lambda x epochs, ASHA)")
    _common(p)
    _tuned(p)
    _option(p, FinetuneOptions, "init", choices=["pretrained", "random"],
            help="random: the checkpoint's architecture trained from scratch with labels only (supervised baseline)")
    p.set_defaults(func=cmd_finetune)
