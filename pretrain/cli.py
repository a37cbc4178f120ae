"""``igpt train`` and ``igpt export``."""
from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    import faulthandler

    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)  # a bad config is reported before anything starts
    faulthandler.enable()  # a rank that dies on a signal leaves its Python stacks in its log
    from pretrain.train import train

    return train(cfg, resume=args.resume)


def _export(args: argparse.Namespace) -> int:
    from pretrain.export import export

    out = export(args.run_dir, args.out, tag=args.tag)
    print(f"wrote {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``export`` to the ``igpt`` command."""
    p = subparsers.add_parser("train", help="pretrain iGPT with DeepSpeed (torchrun / deepspeed / srun / plain)")
    p.add_argument("config", help="YAML preset, e.g. configs/cifar10-cpu-tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, merged last")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto': newest complete checkpoint of the run dir (fresh start if none); or a checkpoint dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(func=_train)

    p = subparsers.add_parser("export", help="consolidate a run's checkpoint into a release dir (fp32 safetensors)")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="release dir to write")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: newest complete)")
    p.set_defaults(func=_export)


def main(argv: list[str] | None = None) -> int:
    """``python -m pretrain.cli train|export …`` (the same commands, and errors, without the other stages)."""
    from igpt_cli import add_common_options, run

    parser = argparse.ArgumentParser(prog="igpt")
    register(parser.add_subparsers(dest="command", required=True))
    return run(add_common_options(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
