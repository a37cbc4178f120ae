"""The `igpt` command line a cluster job runs, as an argv list."""
from __future__ import annotations

# Runs the `igpt` console script's entry point with a given interpreter (no PATH lookup needed).
IGPT_ENTRY = "import sys; from igpt_cli import main; sys.exit(main())"
IGPT_SUBCOMMANDS = ("train", "eval", "export")


def igpt_args(args: list[str], resume: str | None = "auto") -> list[str]:
    """Arguments after `igpt`: ``CONFIG.yaml [key=val …]`` becomes ``train CONFIG … --resume auto``;
    ``train …`` / ``eval …`` / ``export …`` pass through (train gets ``--resume`` unless given)."""
    if not args:
        raise ValueError("nothing to run: give CONFIG.yaml [key=value …] or an igpt subcommand after --")
    if args[0].endswith((".yaml", ".yml")):
        args = ["train", *args]
    elif args[0] not in IGPT_SUBCOMMANDS:
        raise ValueError(f"{args[0]!r} is neither a CONFIG.yaml nor one of the igpt subcommands "
                         f"{', '.join(IGPT_SUBCOMMANDS)}")
    if args[0] == "train" and resume and "--resume" not in args:
        args = [*args, "--resume", resume]
    return args


def python_igpt(python: str, args: list[str]) -> list[str]:
    """``python -c <igpt entry> ARGS``: the igpt CLI under an explicit interpreter."""
    return [python, "-c", IGPT_ENTRY, *args]
