"""Running a parsed ``igpt`` command: the options every command takes, and user errors as one line.

A user error (``igpt.errors.UserError``: a bad config key or value, a palette or checkpoint that does not
fit, an archive that will not download; or a missing or wrong path, an ``OSError`` such as
``FileNotFoundError``) is reported as one line, ``igpt COMMAND: error: …``, with exit code 2 and no
traceback; ``--debug`` raises it with its traceback instead. Every command also takes ``--progress``
(progress bars even when stderr is not a terminal).

This module sits below every stage: the stages' stand-alone ``main``s (``python -m igpt.pretrain.cli …``)
use it as the ``igpt`` script (``igpt.cli``) does.
"""
from __future__ import annotations

import argparse
import os
import sys

from igpt.errors import UserError

# What a person can fix by changing the command line or its inputs; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError,
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
    return isinstance(err, USER_ERRORS)


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


def standalone_main(register, argv: list[str] | None = None) -> int:
    """A stage's commands on their own (``python -m igpt.STAGE.cli …``): ``register(subparsers)`` adds them."""
    parser = argparse.ArgumentParser(prog="igpt")
    register(parser.add_subparsers(dest="cmd", required=True))
    return run(add_common_options(parser).parse_args(argv))
