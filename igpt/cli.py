"""The ``igpt`` console script (and ``python -m igpt``): one subcommand group per pipeline stage.

Each stage's ``cli`` module exposes ``register(subparsers)``; heavy imports (torch, DeepSpeed, Ray,
MLflow) happen inside the command functions so ``igpt --help`` stays fast. How a command runs and how
user errors become one line: ``igpt.runner``.
"""
from __future__ import annotations

import argparse
import sys

from igpt import demo
from igpt.cluster import cli as cluster_cli
from igpt.data_pipeline import cli as data_cli
from igpt.evals import cli as evals_cli
from igpt.pretrain import cli as pretrain_cli
from igpt.runner import add_common_options, run

STAGE_CLIS = (data_cli, pretrain_cli, evals_cli, cluster_cli, demo)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every stage's subcommands registered."""
    parser = argparse.ArgumentParser(
        prog="igpt", description="Image GPT pretraining pipeline: palette → shards → train → eval → launch."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage in STAGE_CLIS:
        stage.register(subparsers)
    return add_common_options(parser)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand, returning its exit code."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
