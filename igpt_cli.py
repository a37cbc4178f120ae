"""The `igpt` console script: one subcommand group per pipeline stage.

Each stage package exposes `cli.register(subparsers)`; heavy imports (torch, DeepSpeed, Ray,
MLflow) happen inside the command functions so `igpt --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

STAGE_CLIS = ("data_pipeline.cli", "pretrain.cli", "evals.cli", "cluster.cli", "pretrain.demo")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every stage's subcommands registered."""
    parser = argparse.ArgumentParser(
        prog="igpt", description="Image GPT pretraining pipeline: palette → shards → train → eval → launch."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in STAGE_CLIS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand, returning its exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
