"""Augmentation on token grids: flips and crops are exact (each augmented sample is the token grid of the
augmented image), val is untouched, and a re-split on another world size keeps every sample's augmentation
(resume at the same layout: tests/test_data_loader.py)."""
from __future__ import annotations

import itertools
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from igpt.data_pipeline.augment import Augment, crop_flip, pad_margin
from igpt.data_pipeline.decode import decode_image
from igpt.data_pipeline.loader import TokenStream, iterate_split, read_samples
from igpt.data_pipeline.manifest import MANIFEST_FILE, Manifest
from igpt.data_pipeline.palette import load_palette
from igpt.data_pipeline.quantize import quantize_bruteforce


def _raw_images(cifar_dir: Path) -> dict[str, bytes]:
    with tarfile.open(cifar_dir / "cifar10-train-000000.tar") as tf:
        return {m.name[: -len(".jpg")]: tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")}


def _identities(data_dir: Path, split: str) -> dict[str, tuple[int, int]]:
    """key -> (shard index in the manifest, position in the shard)."""
    m = Manifest.load(data_dir)
    return {x.key: (i, x.index) for i, sh in enumerate(m.split(split).shards)
            for x in read_samples(str(data_dir / sh.file), m.stored_resolution(split))}


def test_margin_shards_record_stored_and_training_size(cifar_tokens_margin, cifar_tokens):
    m = Manifest.load(cifar_tokens_margin)
    assert m.format_version == 2 and m.resolution == 16 and m.margin == 4 and m.tokens_per_sample == 256
    assert m.stored_resolution("train") == 20 and m.stored_resolution("val") == 16
    plain = Manifest.load(cifar_tokens)
    assert plain.margin == 0 and plain.stored_resolution("train") == 16
    assert m.split("train").num_samples == plain.split("train").num_samples


def test_flips_and_crops_equal_the_tokens_of_the_augmented_image(cifar_dir, cifar_tokens_margin, cifar_tokens):
    raw, ids = _raw_images(cifar_dir), _identities(cifar_tokens_margin, "train")
    palette = load_palette(cifar_tokens_margin / "palette.npy")[0]
    aug = Augment(16, 20, hflip=True, random_crop=True, seed=7)
    draws: Counter = Counter()
    per_epoch = []
    for epoch in range(2):
        stream = TokenStream(cifar_tokens_margin, "train", 50, seed=7, num_workers=2, with_keys=True, hflip=True,
                             random_crop=True)
        stream.epoch = epoch
        seen = {}
        for batch in stream.iter_epoch():
            assert batch["tokens"].shape[1] == 256
            for key, tokens in zip(batch["keys"], batch["tokens"].numpy()):
                dy, dx, flip = seen[key] = aug.draw(epoch, *ids[key])
                if len(seen) <= 600:  # the pixel-space check on the first 600 of each epoch
                    image = pad_margin(decode_image(raw[key], 16), 4)[dy : dy + 16, dx : dx + 16]
                    image = image[:, ::-1] if flip else image
                    assert np.array_equal(tokens, quantize_bruteforce(image, palette).reshape(-1)), (epoch, key)
                    draws[dy, dx, flip] += 1
        assert sorted(seen) == sorted(ids)
        per_epoch.append(seen)
    assert len(draws) == 5 * 5 * 2  # every offset, flipped and not
    changed = sum(per_epoch[0][k] != per_epoch[1][k] for k in ids)
    assert changed > 0.9 * len(ids)  # a new draw each epoch

    # val is stored at the exact size and read as is: the same tokens as unaugmented 16x16 shards
    assert Manifest.load(cifar_tokens_margin).stored_resolution("val") == 16
    val = [b["tokens"] for b in iterate_split(cifar_tokens_margin, "val", 64)]
    exact = [b["tokens"] for b in iterate_split(cifar_tokens, "val", 64)]
    assert all(torch.equal(a, b) for a, b in zip(val, exact)) and len(val) == len(exact)
    first = {k: v for k, v in _identities(cifar_tokens_margin, "val").items()}
    key = next(iter(first))
    assert np.array_equal(val[0][0].numpy(), quantize_bruteforce(decode_image(raw[key], 16), palette).reshape(-1))


def test_centre_crop_is_the_exact_size_image(cifar_tokens_margin, cifar_tokens):
    m = Manifest.load(cifar_tokens_margin)
    stored = {x.key: x.tokens for sh in m.split("train").shards
              for x in read_samples(str(cifar_tokens_margin / sh.file), 20)}
    exact = Manifest.load(cifar_tokens)
    for x in (x for sh in exact.split("train").shards for x in read_samples(str(cifar_tokens / sh.file), 16)):
        assert np.array_equal(crop_flip(stored[x.key], 20, 16, 2, 2, False), x.tokens)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(iterate_split(cifar_tokens_margin, "train", 100),
                                                                       iterate_split(cifar_tokens, "train", 100)))
    stream = TokenStream(cifar_tokens_margin, "train", 64, num_workers=0, with_keys=True)
    batch = next(iter(stream))
    for key, tokens in zip(batch["keys"], batch["tokens"].numpy()):
        assert np.array_equal(tokens, crop_flip(stored[key], 20, 16, 2, 2, False))
    flips = next(iter(TokenStream(cifar_tokens_margin, "train", 64, num_workers=0, hflip=True)))["tokens"]
    plain = batch["tokens"].view(-1, 16, 16)
    mirrored = [torch.equal(f.view(16, 16), p.flip(1)) for f, p in zip(flips, plain)]
    assert all(m or torch.equal(f.view(16, 16), p) for m, f, p in zip(mirrored, flips, plain))
    assert 0 < sum(mirrored) < len(mirrored)  # about half of them mirrored, the rest as they were


def test_random_crop_needs_a_margin(cifar_tokens):
    with pytest.raises(ValueError, match="stored with a margin"):
        TokenStream(cifar_tokens, "train", 8, random_crop=True)


def _ids(batch: dict) -> list[tuple[str, bytes]]:
    return [(k, t.numpy().astype(np.uint16).tobytes()) for k, t in zip(batch["keys"], batch["tokens"])]


AUG = dict(hflip=True, random_crop=True, with_keys=True, seed=3, shuffle_buffer=50)


def test_resplit_on_another_world_size_keeps_each_samples_augmentation(cifar_tokens_margin):
    """An epoch run on 2 ranks, cut and resumed on 1 rank (other workers and batch): each sample is seen once
    with the tokens the uninterrupted run gives it."""
    expected = {}
    for rank in range(2):
        s = TokenStream(cifar_tokens_margin, "train", 16, rank=rank, world_size=2, num_workers=2, **AUG)
        expected.update(kv for b in s.iter_epoch() for kv in _ids(b))
    old = [TokenStream(cifar_tokens_margin, "train", 16, rank=r, world_size=2, num_workers=2, **AUG) for r in range(2)]
    seen = [kv for s in old for b in itertools.islice(iter(s), 20) for kv in _ids(b)]
    new = TokenStream(cifar_tokens_margin, "train", 40, num_workers=1, **AUG)
    new.resume_from([s.state_dict() for s in old])
    seen += [kv for b in new.iter_epoch() for kv in _ids(b)]
    assert Counter(k for k, _ in seen) == Counter(list(expected))  # every sample of the epoch exactly once
    assert dict(seen) == expected  # each with the same crop and flip


def test_format_1_manifests_still_load(cifar_tokens, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(cifar_tokens, old)
    raw = json.loads((old / MANIFEST_FILE).read_text())  # the file as format 1 wrote it
    raw["format_version"] = 1
    del raw["margin"]
    for split in raw["splits"].values():
        del split["stored_resolution"]
    (old / MANIFEST_FILE).write_text(json.dumps(raw))
    assert Manifest.load(old) == Manifest.load(cifar_tokens)  # read as format 2 at the training size
    assert Manifest.load(old).stored_resolution("train") == 16
    a = next(iter(TokenStream(old, "train", 8, seed=1, num_workers=0, hflip=True)))["tokens"]
    b = next(iter(TokenStream(cifar_tokens, "train", 8, seed=1, num_workers=0, hflip=True)))["tokens"]
    assert torch.equal(a, b)
    raw["format_version"] = 3
    (old / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="format_version 3"):
        Manifest.load(old)


def test_shard_cli_margin(cifar_dir, cifar_tokens, tmp_path):
    from igpt.data_pipeline.cli import main

    out = tmp_path / "m"
    assert main(["data", "shard", str(cifar_dir / "cifar10-train-000000.tar"), "--out", str(out), "--palette",
                 str(cifar_tokens / "palette.npy"), "--resolution", "8", "--margin", "2", "--val-fraction", "0.2",
                 "--limit", "40", "--workers", "1"]) == 0
    m = Manifest.load(out)
    assert (m.resolution, m.margin, m.stored_resolution("train"), m.stored_resolution("val")) == (8, 2, 10, 8)
    assert m.settings["margin"] == 2
