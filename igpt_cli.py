"""The `igpt` console script: one subcommand group per pipeline stage.

Each stage package exposes `cli.register(subparsers)`; heavy imports (torch, DeepSpeed, Ray,
MLflow) happen inside the command functions so `igpt --help` stays fast.

A user error (a bad config key or value, a missing or wrong path, a palette or checkpoint that
does not fit, an archive that will not download) is reported as one line, ``igpt COMMAND: error:
…``, with exit code 2 and no traceback; ``--debug`` raises it with its traceback instead.
Every command also takes ``--progress`` (progress bars even when stderr is not a terminal).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

STAGE_CLIS = ("data_pipeline.cli", "pretrain.cli", "evals.cli", "cluster.cli", "pretrain.demo")
# What a person can fix by changing the command line or its inputs (ConfigError and EvalInputError are
# ValueErrors); anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                                                IsADirectoryError, PermissionError)


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every parser of its subcommands, depth first."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser, *(q for a in subs for p in dict.fromkeys(a.choices.values()) for q in all_parsers(p))]


def add_common_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--debug`` and ``--progress`` on every command of ``parser``, and the command's name for messages."""
    leaves = [p for p in all_parsers(parser) if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)]
    for leaf in leaves:
        leaf.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
        leaf.add_argument("--progress", action="store_true",
                          help="show progress bars even when stderr is not a terminal (also: IGPT_PROGRESS=1)")
        leaf.set_defaults(command_prog=leaf.prog)
    return parser


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is about the user's input (see USER_ERRORS) rather than a bug."""
    from data_pipeline.cifar10 import DownloadError  # imported only when something went wrong

    return isinstance(err, (*USER_ERRORS, DownloadError))


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; user errors become one line on stderr and exit code 2."""
    prog = getattr(args, "command_prog", "igpt")
    if getattr(args, "progress", False):
        os.environ["IGPT_PROGRESS"] = "1"  # inherited by the stages' child processes
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not "Creating initial MLflow database tables..."
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if getattr(args, "debug", False) or not is_user_error(err):
            raise
        message = " ".join(line.strip() for line in str(err).strip().splitlines()) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every stage's subcommands registered."""
    parser = argparse.ArgumentParser(
        prog="igpt", description="Image GPT pretraining pipeline: palette → shards → train → eval → launch."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in STAGE_CLIS:
        importlib.import_module(module_name).register(subparsers)
    return add_common_options(parser)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand, returning its exit code."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
