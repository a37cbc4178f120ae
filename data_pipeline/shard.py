"""Images -> palette-token WebDataset shards plus ``manifest.json``.

Each input gets a split by a hash of its id (``--val-fraction``, deterministic for a seed),
each split's inputs are shuffled with the seed and cut into shards of ``shard_size`` inputs,
and every shard is one task for a pool of processes. A shard is written to a temporary name and
renamed, then, once the tar is on the disk (fsynced with its directory by ``igpt.data_pipeline.io``), its
record (sample count, skipped inputs) is written beside it under ``.records/``, so no power loss leaves a
record without its tar; a rerun with the same settings keeps every shard that has a record and redoes
the rest, so an interrupted run resumes. A sample is ``KEY.tokens.npy`` (uint16, R*R, raster
order) plus ``KEY.cls`` (ASCII integer) when labelled.

With a ``margin`` the train split is stored ``margin`` pixels larger than ``resolution``: each image is
decoded at ``resolution`` like any other and mirror-padded by the margin (``igpt.data_pipeline.augment.pad_margin``),
so its centre crop is the exact-size image and random crops are shifts of up to margin/2 pixels, the
usual CIFAR augmentation (``igpt.data_pipeline.augment``). Every other split is stored at ``resolution``, the
exact size that validation and the evals read.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from igpt.data_pipeline.augment import pad_margin
from igpt.data_pipeline.decode import SkipImage, decode_image
from igpt.data_pipeline.io import copy_atomic, write_bytes_atomic, write_json_atomic
from igpt.data_pipeline.manifest import Manifest, ShardInfo, SplitInfo
from igpt.data_pipeline.palette import PALETTE_FILE, load_palette
from igpt.data_pipeline.progress import bar
from igpt.data_pipeline.quantize import Quantizer
from igpt.data_pipeline.sources import Item, find_images, read_item
from igpt.data_pipeline.tario import tar_bytes
from igpt.data_pipeline.token_shards import check_palette
from igpt.errors import UserError

RECORDS_DIR = ".records"
MARGIN_SPLITS = ("train",)  # the splits stored with the margin
_STATE: dict = {}  # per worker process: quantizer, out dir, open tar fds


def npy_header(resolution: int) -> bytes:
    """The .npy header every ``KEY.tokens.npy`` of this resolution starts with."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(resolution * resolution, dtype=np.uint16), allow_pickle=False)
    return buf.getvalue()[: -2 * resolution * resolution]


def split_of(uid: str, val_fraction: float, seed: int) -> str:
    """``val`` for a deterministic ``val_fraction`` of ids (by hash), ``train`` for the rest."""
    if val_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest(), "big")
    return "val" if h < val_fraction * 2.0**64 else "train"


def sample_key(uid: str) -> str:
    """A WebDataset key from an input id: no dots (they separate the key from the extension)."""
    return uid.strip("/").replace(".", "_") or "_"


def _init_worker(quantizer: Quantizer, resolution: int, out_dir: str) -> None:
    _STATE.update(quantizer=quantizer, resolution=resolution, out_dir=Path(out_dir), fds={})


def _write_shard(task: tuple[str, int, list[tuple[str, Item]]]) -> dict:
    """Decode, pad by the task's margin, quantise and write one shard (temp name, rename), then its record;
    return the record."""
    name, margin, keyed = task
    st = _STATE
    r = st["resolution"] + margin
    header = npy_header(r)
    pixels = np.empty((len(keyed), r, r, 3), dtype=np.uint8)
    kept, skipped = [], []
    for key, item in keyed:
        where = item.path if item.offset < 0 else f"{item.path}:{item.uid}"
        try:
            pixels[len(kept)] = pad_margin(decode_image(read_item(item, st["fds"]), st["resolution"]), margin)
        except SkipImage as e:
            skipped.append({"source": where, "reason": e.reason, "detail": e.detail})
            continue
        except OSError as e:
            skipped.append({"source": where, "reason": "unreadable", "detail": str(e)})
            continue
        kept.append((key, item))
    tokens = st["quantizer"].quantize(pixels[: len(kept)]).reshape(len(kept), r * r)
    members = []
    for (key, item), row in zip(kept, tokens):
        members.append((f"{key}.tokens.npy", header + row.tobytes()))
        if item.label is not None:
            members.append((f"{key}.cls", str(item.label).encode()))
    out_dir: Path = st["out_dir"]
    record = {
        "file": f"{name}.tar" if kept else None,
        "num_samples": len(kept),
        "labels": sorted({it.label for _, it in kept if it.label is not None}),
        "unlabelled": sum(it.label is None for _, it in kept),
        "skipped": skipped,
    }
    if kept:  # returns once the tar and its name are durable: only then may the record say the shard is done
        write_bytes_atomic(tar_bytes(members), out_dir / f"{name}.tar")
    # The record needs no fsync of its own: lost in a power cut, it only makes a rerun redo its shard; it
    # must never reach the disk before the tar, which the tar's fsync (above) already ensures.
    write_json_atomic(record, out_dir / RECORDS_DIR / f"{name}.json", durable=False)
    return record


def _plan(items: list[Item], val_fraction: float, shard_size: int, seed: int) -> dict[str, list[tuple[str, list]]]:
    """Shard name -> [(unique sample key, item)] per split."""
    by_split: dict[str, list[tuple[str, Item]]] = {"train": []}
    if val_fraction > 0:
        by_split["val"] = []
    used: set[str] = set()
    for item in items:
        key = base = sample_key(item.uid)
        n = 0
        while key in used:  # e.g. the same key in two tars: keep the samples apart
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        by_split[split_of(item.uid, val_fraction, seed)].append((key, item))
    plan = {}
    for split, its in by_split.items():
        order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(len(its))
        its = [its[i] for i in order]
        plan[split] = [(f"{split}-{i // shard_size:06d}", its[i : i + shard_size]) for i in range(0, len(its), shard_size)]
    return plan


def shard_dataset(
    sources: list[str],
    out_dir: str | os.PathLike,
    palette_path: str | os.PathLike,
    *,
    resolution: int,
    val_fraction: float = 0.0,
    shard_size: int = 2000,
    num_workers: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    class_names: list[str] | None = None,
    progress: bool = True,
    margin: int = 0,
) -> Manifest:
    """Shard ``sources`` into ``out_dir`` (resuming a previous run there); write and return the manifest.

    ``limit`` keeps the first N inputs in listing order; ``class_names`` names integer labels
    of tar sources (ImageFolder sources name their own). ``num_workers`` processes (default:
    all CPUs; 0 or 1 runs in this process). ``progress=False`` hides the progress bars, which
    otherwise show as ``igpt.data_pipeline.progress`` decides. ``margin``: the train split's extra pixels
    (see the module docstring).
    """
    if resolution < 1:
        raise UserError(f"resolution must be positive, got {resolution}")
    if not 0 <= margin < 2 * resolution - 1:
        raise UserError(f"margin must be in [0, {2 * resolution - 2}] at resolution {resolution}, got {margin}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_size < 1:
        raise UserError(f"shard_size must be positive, got {shard_size}")
    palette, sha = load_palette(palette_path)
    found = find_images([str(s) for s in sources])
    items = found.items[:limit] if limit is not None else found.items
    names = found.class_names or (list(class_names) if class_names else None)

    out = Path(out_dir)
    (out / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    settings = {
        "sources": [str(s) for s in sources],
        "num_inputs": len(items),
        "palette_sha256": sha,
        "resolution": resolution,
        "val_fraction": val_fraction,
        "shard_size": shard_size,
        "seed": seed,
        "limit": limit,
        **({"margin": margin} if margin else {}),  # absent without one: earlier directories still resume
    }
    settings_file = out / RECORDS_DIR / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings:
        raise UserError(f"{out} holds shards made with other settings ({settings_file}); use a new directory")
    write_json_atomic(settings, settings_file)
    if (out / PALETTE_FILE).exists():
        check_palette(load_palette(out / PALETTE_FILE)[1], sha, f"{out / PALETTE_FILE} is a different palette than "
                      f"{palette_path}; use a new directory")
    copy_atomic(palette_path, out / PALETTE_FILE)

    plan = _plan(items, val_fraction, shard_size, seed)
    margins = {split: margin if split in MARGIN_SPLITS else 0 for split in plan}
    todo = [(name, margins[split], its) for split, tasks in plan.items() for name, its in tasks
            if not (out / RECORDS_DIR / f"{name}.json").exists()]
    for name, *_ in todo:  # a killed run can leave a shard's temp file behind: the shard is written afresh
        for stale in out.glob(f".{name}.*tmp*"):
            stale.unlink()
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    quantizer = Quantizer.from_file(palette_path, progress=progress)
    with bar(total=sum(len(its) for *_, its in todo), unit="img", desc=f"shard {out.name}", show=progress) as b:
        _run(todo, (quantizer, resolution, str(out)), workers, b)
    manifest = _manifest(plan, out, sha, resolution, margins, palette.shape[0], names, found.skipped, settings)
    manifest.save(out)
    return manifest


def _run(todo: list, init: tuple, workers: int, progress_bar: tqdm) -> None:
    if workers <= 1 or len(todo) <= 1:
        _init_worker(*init)
        for rec in map(_write_shard, todo):
            progress_bar.update(rec["num_samples"] + len(rec["skipped"]))
        return
    with mp.get_context("fork").Pool(min(workers, len(todo)), _init_worker, init) as pool:
        for rec in pool.imap_unordered(_write_shard, todo):
            progress_bar.update(rec["num_samples"] + len(rec["skipped"]))


def _manifest(plan, out: Path, sha: str, resolution: int, margins: dict[str, int], vocab: int, names,
              listing_skips, settings) -> Manifest:
    splits, skipped, labels, unlabelled = {}, [s._asdict() for s in listing_skips], set(), 0
    for split, tasks in plan.items():
        shards = []
        for name, _ in tasks:
            rec = json.loads((out / RECORDS_DIR / f"{name}.json").read_text())
            skipped.extend(rec["skipped"])
            labels.update(rec["labels"])
            unlabelled += rec["unlabelled"]
            if rec["num_samples"]:
                shards.append(ShardInfo(rec["file"], rec["num_samples"]))
        splits[split] = SplitInfo(num_samples=sum(s.num_samples for s in shards),
                                  stored_resolution=resolution + margins[split], shards=shards)
    labelled = bool(labels) and unlabelled == 0
    if labelled and names is not None and max(labels) >= len(names):
        raise UserError(f"label {max(labels)} has no name among {len(names)} class names")
    return Manifest(
        resolution=resolution,
        margin=settings.get("margin", 0),
        palette_sha256=sha,
        palette_file=PALETTE_FILE,
        vocab_size=vocab,
        labelled=labelled,
        num_classes=(len(names) if names else max(labels) + 1) if labelled else None,
        class_names=names if labelled else None,
        splits=splits,
        num_inputs=settings["num_inputs"] + len(listing_skips),
        skipped=skipped,
        skipped_counts=dict(sorted(Counter(s["reason"] for s in skipped).items())),
        settings=settings,
    )
