"""Sharding: real CIFAR-10 tars, generated ImageFolders with a zoo of bad inputs, resume, CLI, inspect."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igpt.data_pipeline.decode import decode_image
from igpt.data_pipeline.loader import read_shard
from igpt.data_pipeline.manifest import MANIFEST_FILE, Manifest
from igpt.data_pipeline.palette import save_palette, uniform9_palette
from igpt.data_pipeline.quantize import quantize_bruteforce
from igpt.data_pipeline.shard import RECORDS_DIR, shard_dataset, split_of

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def palette_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("palette") / "palette.npy"
    save_palette(uniform9_palette(), path)
    return path


def _samples(out: Path, manifest: Manifest) -> dict[str, tuple[np.ndarray, int | None]]:
    """key -> (tokens, label) over all splits, read with an independent tar reader."""
    import tarfile

    found = {}
    for split in manifest.splits.values():
        for shard in split.shards:
            with tarfile.open(out / shard.file) as tf:
                members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
            for name, data in members.items():
                if name.endswith(".tokens.npy"):
                    key = name[: -len(".tokens.npy")]
                    cls = members.get(f"{key}.cls")
                    found[key] = (np.load(io.BytesIO(data)), None if cls is None else int(cls))
    return found


def test_cifar_tokens_match_independent_decode_and_brute_force(cifar_dir, palette_path, tmp_path):
    tar = cifar_dir / "cifar10-train-000000.tar"
    m = shard_dataset([str(tar)], tmp_path, palette_path, resolution=32, val_fraction=0.2, shard_size=40,
                      num_workers=2, limit=150, progress=False)
    assert m.num_inputs == 150 and not m.skipped
    assert m.split("train").num_samples + m.split("val").num_samples == 150
    assert sum(s.num_samples for s in m.split("train").shards) == m.split("train").num_samples
    assert m.labelled and m.num_classes == 10 and m.resolution == 32
    assert (tmp_path / "palette.npy").read_bytes() == palette_path.read_bytes()
    assert Manifest.load(tmp_path) == m
    text = (tmp_path / MANIFEST_FILE).read_text()  # the file: the record's keys in their order, indent 1
    assert text == json.dumps(m.to_dict(), indent=1) + "\n"
    assert list(json.loads(text)) == [
        "format_version", "resolution", "margin", "palette_sha256", "palette_file", "vocab_size", "tokens_per_sample",
        "labelled", "num_classes", "class_names", "splits", "num_inputs", "skipped", "skipped_counts", "settings"]
    (tmp_path / "copy").mkdir()
    m.save(tmp_path / "copy")
    assert (tmp_path / "copy" / MANIFEST_FILE).read_text() == text
    samples = _samples(tmp_path, m)
    assert len(samples) == 150
    import tarfile

    with tarfile.open(tar) as tf:
        raw = {}
        for member in tf:
            raw[member.name] = tf.extractfile(member).read()
            if len(raw) >= 300:
                break
    for key, (tokens, label) in list(samples.items())[:20]:
        rgb = np.asarray(Image.open(io.BytesIO(raw[f"{key}.jpg"])).convert("RGB"))
        assert tokens.dtype == np.uint16 and tokens.shape == (1024,)
        assert np.array_equal(tokens, quantize_bruteforce(rgb, uniform9_palette()).reshape(-1))
        assert label == int(raw[f"{key}.cls"])
    # the val split is the hash of the key: deterministic and independent of shard size or workers
    for key in samples:
        in_val = any(key in {k for k in _keys(tmp_path / s.file)} for s in m.split("val").shards)
        assert in_val == (split_of(key, 0.2, 0) == "val")


def _keys(shard: Path) -> list[str]:
    import tarfile

    with tarfile.open(shard) as tf:
        return [n[: -len(".tokens.npy")] for n in tf.getnames() if n.endswith(".tokens.npy")]


def test_shards_are_readable_by_webdataset(cifar_dir, palette_path, tmp_path):
    import webdataset as wds

    shard_dataset([str(cifar_dir / "cifar10-train-000000.tar")], tmp_path, palette_path, resolution=16,
                  shard_size=30, num_workers=1, limit=30, progress=False)
    ours = list(read_shard(str(tmp_path / "train-000000.tar"), 16))
    theirs = list(wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False).decode())
    assert len(ours) == len(theirs) == 30
    for (tokens, label), sample in zip(ours, theirs):
        assert np.array_equal(tokens, sample["tokens.npy"]) and label == int(sample["cls"])


def _png16_rgb(path: Path, arr: np.ndarray) -> None:
    """Write a 48-bit RGB PNG by hand (Pillow cannot)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _zoo(root: Path) -> dict[str, str | None]:
    """An ImageFolder of generated inputs; returns file name -> expected skip reason (None: kept)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    a, b = root / "cat", root / "dog"
    a.mkdir(parents=True)
    b.mkdir()
    Image.fromarray(rgb).save(a / "rgb.png")
    Image.fromarray(rgb).save(a / "rgb.jpg", quality=90)
    Image.fromarray(rgb).convert("L").save(a / "gray.png")
    Image.fromarray(rgb).convert("P").save(a / "palette.png")
    Image.fromarray(rgb).convert("P").save(a / "palette_transparent.png", transparency=0)
    Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (40, 56), dtype=np.uint8)])).save(a / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(b / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65536, (20, 20))).astype(np.uint16)).save(b / "gray16.png")
    _png16_rgb(b / "rgb16.png", rng.integers(0, 65536, (9, 13, 3)))
    Image.fromarray(rgb[:1, :1]).save(b / "one_pixel.png")
    Image.fromarray(rgb).save(b / "has.dots.in.name.webp")
    Image.fromarray(rng.integers(0, 2**31, (8, 8)).astype(np.int32)).save(b / "int32.tif")
    jpg = (a / "rgb.jpg").read_bytes()
    (b / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    png = (a / "rgb.png").read_bytes()
    (b / "truncated.png").write_bytes(png[: len(png) // 2])
    (b / "corrupt.jpg").write_bytes(jpg[:200] + bytes(rng.integers(0, 256, 600, dtype=np.uint8)))
    (b / "zero.png").write_bytes(b"")
    (b / "notes.txt").write_text("not an image")
    (b / "random.jpg").write_bytes(bytes(rng.integers(0, 256, 500, dtype=np.uint8)))
    (root / "stray.png").write_bytes(png)
    return {"rgb.png": None, "rgb.jpg": None, "gray.png": None, "palette.png": None, "palette_transparent.png": None,
            "rgba.png": None, "cmyk.jpg": None, "gray16.png": None, "rgb16.png": None, "one_pixel.png": None,
            "has.dots.in.name.webp": None, "int32.tif": "unsupported-mode", "truncated.jpg": "truncated",
            "truncated.png": "truncated", "corrupt.jpg": "corrupt", "zero.png": "empty-file",
            "notes.txt": "not-an-image", "random.jpg": "not-an-image", "stray.png": "outside-class-folder"}


def test_bad_input_zoo_is_converted_or_counted(tmp_path, palette_path):
    expected = _zoo(tmp_path / "zoo")
    m = shard_dataset([str(tmp_path / "zoo")], tmp_path / "out", palette_path, resolution=8, shard_size=4,
                      num_workers=2, progress=False)
    kept = [k for k, v in expected.items() if v is None]
    assert m.num_inputs == len(expected)
    assert m.split("train").num_samples == len(kept) == m.num_inputs - len(m.skipped)
    got = {Path(s["source"]).name: s["reason"] for s in m.skipped}
    assert got == {k: v for k, v in expected.items() if v is not None}
    assert sum(m.skipped_counts.values()) == len(m.skipped)
    assert m.class_names == ["cat", "dog"] and m.num_classes == 2
    samples = _samples(tmp_path / "out", m)
    assert {k.split("/")[-1] for k in samples} == {k.replace(".", "_") for k in kept}  # rgb.png and rgb.jpg both kept
    assert all(label == (0 if k.startswith("zoo/cat") else 1) for k, (_, label) in samples.items())
    # the kept images are exactly: decode, convert, resize short side + centre crop, brute-force quantise
    for name, ref in [("rgb.png", None), ("gray16.png", None), ("rgba.png", None)]:
        path = next((tmp_path / "zoo").rglob(name))
        rgb = decode_image(path.read_bytes(), 8)
        key = next(k for k in samples if k.endswith(name.replace(".", "_")))
        assert np.array_equal(samples[key][0], quantize_bruteforce(rgb, uniform9_palette()).reshape(-1))
    # conversions: 16-bit keeps the high byte, alpha is composited over white
    g16 = np.asarray(Image.open(tmp_path / "zoo/dog/gray16.png"))
    assert np.array_equal(decode_image((tmp_path / "zoo/dog/gray16.png").read_bytes(), 20)[..., 0], (g16 >> 8).astype(np.uint8))
    white = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    buf = io.BytesIO()
    white.save(buf, "PNG")
    assert (decode_image(buf.getvalue(), 4) == 255).all()


def test_resize_short_side_and_centre_crop():
    im = Image.new("RGB", (60, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 12, 20))  # red well left of the centre square
    buf = io.BytesIO()
    im.save(buf, "PNG")
    out = decode_image(buf.getvalue(), 10)
    assert out.shape == (10, 10, 3) and (out == [0, 0, 255]).all()


def test_missing_and_empty_sources_are_clear_errors(tmp_path, palette_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shard_dataset([str(tmp_path / "nope")], tmp_path / "o1", palette_path, resolution=8)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        shard_dataset([str(tmp_path / "*.png")], tmp_path / "o2", palette_path, resolution=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        shard_dataset([str(tmp_path / "empty")], tmp_path / "o3", palette_path, resolution=8)
    (tmp_path / "notatar.tar").write_bytes(b"hello" * 200)  # an input skipped as bad-tar, so nothing is left
    with pytest.raises(ValueError, match=r"hold no images \(1 inputs rejected; the first, bad-tar: .*notatar.tar: not a tar header at byte 0"):
        shard_dataset([str(tmp_path / "notatar.tar")], tmp_path / "o4", palette_path, resolution=8)


def test_glob_source_is_unlabelled(tmp_path, palette_path):
    for i in range(5):
        Image.new("RGB", (12, 9), (i * 40, 0, 0)).save(tmp_path / f"img{i}.png")
    m = shard_dataset([str(tmp_path / "img*.png")], tmp_path / "out", palette_path, resolution=4, num_workers=1,
                      progress=False)
    assert m.split("train").num_samples == 5 and not m.labelled and m.class_names is None


def _digest(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def test_resume_keeps_finished_shards_and_redoes_the_rest(cifar_dir, palette_path, tmp_path):
    sources = [str(cifar_dir / "cifar10-train-000000.tar")]
    kw = dict(val_fraction=0.1, shard_size=25, num_workers=2, limit=200, progress=False)
    ref = shard_dataset(sources, tmp_path / "ref", palette_path, resolution=16, **kw)
    out = tmp_path / "run"
    shard_dataset(sources, out, palette_path, resolution=16, **kw)
    # simulate an interruption: no manifest, two shards unrecorded (one half-written), a stale temp file
    (out / "manifest.json").unlink()
    for name in ["train-000002", "val-000000"]:
        (out / RECORDS_DIR / f"{name}.json").unlink()
    (out / "train-000002.tar").write_bytes(b"partial")
    (out / ".train-000003.tar.tmp12345").write_bytes(b"junk")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / ".train-000002.tmp12345.tar").write_bytes(b"half")  # the temp of a shard being written when killed
    time.sleep(0.01)
    m = shard_dataset(sources, out, palette_path, resolution=16, **kw)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert {n for n in before if before[n] != after[n]} == {"train-000002.tar", "val-000000.tar"}
    assert not (out / ".train-000002.tmp12345.tar").exists()  # removed: the shard was written afresh
    assert _digest(out) == _digest(tmp_path / "ref")
    assert m.splits == ref.splits
    # other settings in the same directory are refused
    with pytest.raises(ValueError, match="other settings"):
        shard_dataset(sources, out, palette_path, resolution=32, **kw)


def test_resume_after_killed_process(cifar_dir, palette_path, tmp_path):
    src = str(cifar_dir / "cifar10-train-000000.tar")
    cmd = [sys.executable, "-m", "igpt.data_pipeline.cli", "data", "shard", src, "--out", str(tmp_path / "run"), "--palette", str(palette_path), "--resolution", "16",
           "--shard-size", "20", "--workers", "1", "--limit", "4000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = tmp_path / "run" / RECORDS_DIR
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and len(list(records.glob("train-*.json"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "manifest.json").exists()
    done = len(list(records.glob("*-*.json")))
    assert 3 <= done < 200
    rc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    m = Manifest.load(tmp_path / "run")
    assert m.split("train").num_samples == 4000
    ref = shard_dataset([src], tmp_path / "ref", palette_path, resolution=16, shard_size=20, num_workers=2,
                        limit=4000, progress=False)
    assert _digest(tmp_path / "run") == _digest(tmp_path / "ref") and m.splits == ref.splits
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_cli_palette_shard_inspect(cifar_dir, tmp_path, capsys):
    from igpt.data_pipeline.cli import register

    parser = argparse.ArgumentParser(prog="igpt")
    register(parser.add_subparsers(dest="cmd", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    assert run("palette", "fit", "--kind", "kmeans512", "--source", str(cifar_dir / "cifar10-train-000000.tar"),
               "--out", str(tmp_path / "km.npy"), "--max-images", "100", "--pixels-per-image", "16", "--iters", "3") == 0
    assert np.load(tmp_path / "km.npy").shape == (512, 3)
    assert run("data", "shard", str(cifar_dir / "cifar10-train-000000.tar"), "--out", str(tmp_path / "tok"),
               "--palette", str(tmp_path / "km.npy"), "--resolution", "8", "--limit", "64", "--val-fraction", "0.25",
               "--class-names", "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck", "--workers", "1") == 0
    m = Manifest.load(tmp_path / "tok")
    assert m.class_names[0] == "airplane" and m.split("val").num_samples > 0
    capsys.readouterr()
    assert run("data", "inspect", str(tmp_path / "tok"), "--count", "16") == 0
    text = capsys.readouterr().out
    assert "resolution 8x8" in text and "split train" in text and "airplane" in text
    grid = Image.open(tmp_path / "tok" / "samples-train.png")
    assert grid.size[0] >= 4 * 8 and grid.mode == "RGB"


def test_fast_jpeg_path_is_identical_to_pillow(cifar_dir):
    import tarfile

    from igpt.data_pipeline.decode import _fast_jpeg

    blobs = []
    with tarfile.open(cifar_dir / "cifar10-train-000000.tar") as tf:
        for m in tf:
            if m.name.endswith(".jpg"):
                blobs.append(tf.extractfile(m).read())
            if len(blobs) == 1000:
                break
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for kw in [dict(progressive=True), dict(subsampling=0), dict(quality=5, optimize=True)]:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", **kw)
        blobs.append(buf.getvalue())
    for b in blobs:
        fast = _fast_jpeg(b)
        assert fast is not None and np.array_equal(np.asarray(fast), np.asarray(Image.open(io.BytesIO(b)).convert("RGB")))
    buf = io.BytesIO()
    Image.fromarray(arr).convert("L").save(buf, "JPEG")
    assert _fast_jpeg(buf.getvalue()) is None  # not 3 components: the full Pillow path handles it
    assert _fast_jpeg(blobs[-1][: len(blobs[-1]) // 2]) is None  # truncated: classified by the full path


def test_duplicate_keys_across_sources_stay_separate_samples(cifar_dir, palette_path, tmp_path):
    tar = str(cifar_dir / "cifar10-train-000000.tar")
    once = shard_dataset([tar], tmp_path / "once", palette_path, resolution=4, shard_size=1000, num_workers=1,
                         progress=False)
    n = once.split("train").num_samples
    assert n > 1000
    m = shard_dataset([tar, tar], tmp_path, palette_path, resolution=4, shard_size=1000, num_workers=1,
                      progress=False)
    assert m.split("train").num_samples == 2 * n
    keys = [k for s in m.split("train").shards for k in _keys(tmp_path / s.file)]
    assert len(keys) == len(set(keys)) == 2 * n
    assert sum(1 for _ in read_shard(str(tmp_path / m.split("train").shards[0].file), 4)) == 1000
