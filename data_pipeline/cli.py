"""``igpt palette fit`` and ``igpt data shard|inspect``."""
from __future__ import annotations

import argparse
import sys

from igpt.data_pipeline.fit import fit_palette_from_sources
from igpt.data_pipeline.inspect import inspect_dir
from igpt.data_pipeline.palette import save_palette, uniform9_palette
from igpt.data_pipeline.quantize import Quantizer
from igpt.data_pipeline.shard import shard_dataset
from igpt.errors import UserError
from igpt.runner import standalone_main


def _palette_fit(args: argparse.Namespace) -> int:
    if args.kind == "uniform9":
        palette = uniform9_palette()
    else:
        if not args.source:
            raise UserError("--kind kmeans512 needs --source (the images to fit on), or use --kind uniform9")
        palette = fit_palette_from_sources(
            args.source, resolution=args.resolution, k=512, max_images=args.max_images,
            pixels_per_image=args.pixels_per_image, seed=args.seed, iters=args.iters, device=args.device,
        )
    sha = save_palette(palette, args.out)
    Quantizer.from_file(args.out)  # build and cache the lookup table now
    print(f"{args.out}: {len(palette)} colours, sha256 {sha}")
    return 0


def _shard(args: argparse.Namespace) -> int:
    names = args.class_names.split(",") if args.class_names else None
    manifest = shard_dataset(
        args.sources, args.out, args.palette, resolution=args.resolution, val_fraction=args.val_fraction,
        shard_size=args.shard_size, num_workers=args.workers, seed=args.seed, limit=args.limit, class_names=names,
        margin=args.margin,
    )
    counts = ", ".join(f"{k} {v.num_samples}" for k, v in manifest.splits.items())
    print(f"{args.out}: {counts}; skipped {len(manifest.skipped)} {manifest.skipped_counts}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    text, png = inspect_dir(args.dir, args.out, args.split, args.count)
    print(text)
    print(f"sample grid: {png}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``palette`` and ``data`` subcommands to the ``igpt`` parser."""
    palette = subparsers.add_parser("palette", help="colour palettes").add_subparsers(dest="palette_cmd", required=True)
    fit = palette.add_parser("fit", help="make a palette.npy (k-means on data, or the fixed 9-bit palette)")
    fit.add_argument("--kind", choices=["kmeans512", "uniform9"], default="kmeans512")
    fit.add_argument("--source", nargs="*", default=[], help="image sources (dirs, tars with {a..b}, globs)")
    fit.add_argument("--out", required=True, help="palette .npy to write")
    fit.add_argument("--resolution", type=int, default=32, help="images are resized/cropped to this first")
    fit.add_argument("--max-images", type=int, default=10000)
    fit.add_argument("--pixels-per-image", type=int, default=64)
    fit.add_argument("--iters", type=int, default=30)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    fit.set_defaults(func=_palette_fit)

    data = subparsers.add_parser("data", help="token shards").add_subparsers(dest="data_cmd", required=True)
    shard = data.add_parser("shard", help="images -> palette-token WebDataset shards + manifest.json")
    shard.add_argument("sources", nargs="+", help="ImageFolder dirs, raw-image tars (brace-expanded) or globs")
    shard.add_argument("--out", required=True)
    shard.add_argument("--palette", required=True)
    shard.add_argument("--resolution", type=int, default=32)
    shard.add_argument("--margin", type=int, default=0,
                       help="store the train split this many pixels larger than --resolution, for random crops "
                            "(data.random_crop); the other splits stay at --resolution")
    shard.add_argument("--val-fraction", type=float, default=0.0)
    shard.add_argument("--shard-size", type=int, default=2000)
    shard.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    shard.add_argument("--seed", type=int, default=0)
    shard.add_argument("--limit", type=int, default=None, help="only the first N inputs")
    shard.add_argument("--class-names", default=None, help="comma-separated names of integer labels")
    shard.set_defaults(func=_shard)

    insp = data.add_parser("inspect", help="print a shard directory's manifest summary and write a PNG grid")
    insp.add_argument("dir")
    insp.add_argument("--out", default=None, help="PNG path (default DIR/samples-SPLIT.png)")
    insp.add_argument("--split", default="train")
    insp.add_argument("--count", type=int, default=64)
    insp.set_defaults(func=_inspect)


def main(argv: list[str] | None = None) -> int:
    """The data-stage commands on their own: ``python -m igpt.data_pipeline.cli data shard …``."""
    return standalone_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
