"""The `igpt` command line a cluster job runs, as an argv list."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from igpt.errors import UserError
from igpt.runner import add_common_options, all_parsers

if TYPE_CHECKING:  # the config module imports torch: only when a command is checked
    from igpt.pretrain.config import TrainConfig

# Runs the `igpt` console script's entry point with a given interpreter (no PATH lookup needed).
IGPT_ENTRY = "import sys; from igpt.cli import main; sys.exit(main())"
IGPT_SUBCOMMANDS = ("train", "eval", "export")


def igpt_args(args: list[str], resume: str | None = "auto") -> list[str]:
    """Arguments after `igpt`: ``CONFIG.yaml [key=val …]`` becomes ``train CONFIG … --resume auto``;
    ``train …`` / ``eval …`` / ``export …`` pass through (train gets ``--resume`` unless given)."""
    if not args:
        raise UserError("nothing to run: give CONFIG.yaml [key=value …] or an igpt subcommand after --")
    if args[0].endswith((".yaml", ".yml")):
        args = ["train", *args]
    elif args[0] not in IGPT_SUBCOMMANDS:
        raise UserError(f"{args[0]!r} is neither a CONFIG.yaml nor one of the igpt subcommands "
                         f"{', '.join(IGPT_SUBCOMMANDS)}")
    if args[0] == "train" and resume and "--resume" not in args:
        args = [*args, "--resume", resume]
    return args


def python_igpt(python: str, args: list[str]) -> list[str]:
    """``python -c <igpt entry> ARGS``: the igpt CLI under an explicit interpreter."""
    return [python, "-c", IGPT_ENTRY, *args]


# Options of igpt subcommands that name local inputs (checked, with a warning only, before a job is sent).
PATH_OPTIONS = {"checkpoint": "--checkpoint", "data": "--data", "test_data": "--test-data", "search": "--search",
                "run_dir": "RUN_DIR"}


@dataclass
class CheckedCommand:
    """What ``check_command`` found: warnings about local paths, and a training command's resolved config."""

    warnings: list[str]
    config: "TrainConfig | None"  # None unless the command is `train`


def job_parser() -> argparse.ArgumentParser:
    """The parser of the commands a cluster job runs (``IGPT_SUBCOMMANDS``), as the ``igpt`` script parses them."""
    from igpt.evals import cli as evals_cli
    from igpt.pretrain import cli as pretrain_cli

    parser = argparse.ArgumentParser(prog="igpt")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    pretrain_cli.register(subparsers)
    evals_cli.register(subparsers)
    return add_common_options(parser)


def check_command(args: list[str]) -> CheckedCommand:
    """Validate the igpt command line ``args`` (as ``igpt_args`` returns it) before a job is rendered or submitted.

    A bad option, a missing or invalid training config is an error (ValueError); inputs that do not exist
    here only give warnings, since the cluster's nodes may see paths this host does not.
    """
    def refuse(message: str) -> None:
        raise UserError(f"igpt {' '.join(args)}: {message}")

    parser = job_parser()
    for p in all_parsers(parser):
        p.error = refuse  # type: ignore[method-assign]  # argparse would print usage and exit
    ns = parser.parse_args(args)
    paths: dict[str, str] = {}
    cfg = None
    if args[0] == "train":
        from igpt.pretrain.config import load_config

        cfg = load_config(ns.config, ns.overrides)
        paths["data.dir"] = cfg.data.dir
        if cfg.train.init_from:
            paths["train.init_from"] = cfg.train.init_from
        if ns.resume not in (None, "auto"):
            paths["--resume"] = ns.resume
    for name, label in PATH_OPTIONS.items():
        if getattr(ns, name, None):
            paths[label] = getattr(ns, name)
    warnings = [f"{key} {value} does not exist on this host (fine if the cluster's nodes see it)"
                for key, value in paths.items() if not Path(value).exists()]
    return CheckedCommand(warnings, cfg)
