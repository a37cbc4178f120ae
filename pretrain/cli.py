"""``igpt train``, ``igpt export`` (a release, or a Hugging Face directory) and ``igpt import hf``."""
from __future__ import annotations

import argparse

from igpt.errors import UserError
from igpt.runner import standalone_main


def add_trust_option(p: argparse.ArgumentParser) -> None:
    """``--trust-checkpoint``, the commands' way to load a run dir's checkpoint that is not the user's own."""
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a run dir's checkpoint even if it is not yours (its pickles can run code; trust its "
                        "author), and unpickle it in full; also IGPT_TRUST_CHECKPOINT=1. Release dirs need no trust")


def _train(args: argparse.Namespace) -> int:
    import faulthandler

    from igpt.pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)  # a bad config is reported before anything starts
    faulthandler.enable()  # a rank that dies on a signal leaves its Python stacks in its log
    from igpt.pretrain.train import train

    return train(cfg, resume=args.resume, trust_checkpoint=args.trust_checkpoint)


def _export(args: argparse.Namespace) -> int:
    if args.format == "hf":
        if args.tag is not None:
            raise UserError("--tag picks a checkpoint for --format release; --format hf takes the newest")
        from igpt.pretrain.hf import export_hf

        out = export_hf(args.run_dir, args.out, trust=args.trust_checkpoint)
    else:
        from igpt.pretrain.export import export

        out = export(args.run_dir, args.out, tag=args.tag, trust=args.trust_checkpoint)
    print(f"wrote {out}")
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from igpt.pretrain.hf import import_hf

    if args.compare_limit < 1:
        raise UserError(f"--compare-limit must be >= 1, got {args.compare_limit}")
    report = import_hf(args.hf_dir, args.out, images=args.compare_images, limit=args.compare_limit)
    print(report.rounding.describe())
    if report.disagreement is not None:
        print(report.disagreement.describe())
    print(f"wrote {report.release}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``export`` and ``import`` to the ``igpt`` command."""
    p = subparsers.add_parser("train", help="pretrain iGPT with DeepSpeed (torchrun / deepspeed / srun / plain)")
    p.add_argument("config", help="YAML preset, e.g. configs/cifar10-cpu-tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, merged last")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto': newest complete checkpoint of the run dir (fresh start if none); or a checkpoint dir")
    add_trust_option(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(func=_train)

    p = subparsers.add_parser("export", help="consolidate a run's checkpoint into a release dir (fp32 safetensors), "
                                             "or a run or release into a Hugging Face ImageGPT dir")
    p.add_argument("run_dir", metavar="RUN_OR_RELEASE", help="run dir (release format), or run or release dir (hf)")
    p.add_argument("--out", required=True, help="dir to write")
    p.add_argument("--format", choices=("release", "hf"), default="release",
                   help="release: our format; hf: from_pretrained-loadable ImageGPTForCausalImageModeling with "
                        "preprocessor_config.json (needs model.norm=rms and the ar objective)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: newest complete)")
    add_trust_option(p)
    p.set_defaults(func=_export)

    group = subparsers.add_parser("import", help="bring outside weights into our release format")
    kinds = group.add_subparsers(dest="kind", metavar="KIND", required=True)
    p = kinds.add_parser("hf", help="a Hugging Face ImageGPT dir (e.g. openai/imagegpt-small) → a release dir")
    p.add_argument("hf_dir", help="dir with config.json, the weights and preprocessor_config.json")
    p.add_argument("--out", required=True, help="release dir to write")
    p.add_argument("--compare-images", nargs="+", default=None, metavar="SOURCE",
                   help="images (as for 'igpt data shard') on which to count how often the rounded palette's "
                        "tokens differ from the float centres' (those of Hugging Face's processor)")
    p.add_argument("--compare-limit", type=int, default=2000, help="images compared at most")
    p.set_defaults(func=_import_hf)


def main(argv: list[str] | None = None) -> int:
    """``python -m igpt.pretrain.cli train|export|import …`` (the same commands, and errors, without the other stages)."""
    return standalone_main(register, argv)


if __name__ == "__main__":
    raise SystemExit(main())
