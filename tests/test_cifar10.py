"""CIFAR-10 download and conversion against a local HTTP server serving an archive in the official format."""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_archive import ArchiveServer, sample_images, write_archive
from igpt.data_pipeline.cifar10 import MARKER, DownloadError, ensure_cifar10
from igpt.data_pipeline.palette import save_palette, uniform9_palette
from igpt.data_pipeline.shard import shard_dataset
from igpt.errors import UserError


@pytest.fixture(scope="module")
def archive(cifar_dir, tmp_path_factory) -> tuple[bytes, str, np.ndarray, np.ndarray]:
    """(archive bytes, md5, images, labels): 120 sample images over five batches, plus a test batch."""
    images, labels = sample_images(cifar_dir / "cifar10-train-000000.tar", 120)
    path = tmp_path_factory.mktemp("archive") / "cifar-10-binary.tar.gz"
    md5 = write_archive(path, images, labels)
    return path.read_bytes(), md5, images, labels


def _read_tars(pattern_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, labels, keys = [], [], []
    for tar in sorted(pattern_dir.glob("cifar10-train-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                data = tf.extractfile(m).read()
                if m.name.endswith(".png"):
                    images.append(np.asarray(Image.open(io.BytesIO(data))))
                    keys.append(m.name[:-4])
                else:
                    labels.append(int(data))
    return np.stack(images), np.array(labels), keys


def test_download_verifies_converts_and_is_reused(archive, tmp_path):
    payload, md5, images, labels = archive
    log: list[str] = []
    with ArchiveServer(payload) as server:
        pattern = ensure_cifar10(tmp_path / "cache", server.url, md5, log.append)
        assert ensure_cifar10(tmp_path / "cache", server.url, md5, log.append) == pattern
    assert len(server.requests) == 1  # the second call reuses the conversion
    assert any(f"md5 {md5} verified" in line for line in log) and "using the converted copy" in log[-1]
    out = Path(pattern).parent
    got, got_labels, keys = _read_tars(out)
    assert np.array_equal(got, images) and np.array_equal(got_labels, labels)  # lossless, in order, no test batch
    assert keys == [f"cifar10_train_{i:05d}" for i in range(120)]
    assert (out / MARKER).is_file() and not list(out.parent.glob("*.tar.gz*"))  # archive removed once converted
    palette = tmp_path / "palette.npy"
    save_palette(uniform9_palette(), palette)
    m = shard_dataset([pattern], tmp_path / "tokens", palette, resolution=8, num_workers=1, progress=False)
    assert m.labelled and m.num_inputs == 120 and not m.skipped


def test_md5_mismatch_deletes_the_download(archive, tmp_path):
    payload, md5, _, _ = archive
    with ArchiveServer(payload) as server, pytest.raises(DownloadError, match="does not match the expected"):
        ensure_cifar10(tmp_path, server.url, "0" * 32, print)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_truncated_archive_is_refused(archive, tmp_path):
    payload, md5, _, _ = archive
    short = payload[: len(payload) * 2 // 3]
    with ArchiveServer(short) as server:  # served whole: the md5 tells
        with pytest.raises(DownloadError, match="md5"):
            ensure_cifar10(tmp_path / "a", server.url, md5, print)
        with pytest.raises(ValueError, match="not a readable CIFAR-10 binary archive"):  # even with its own md5
            ensure_cifar10(tmp_path / "b", server.url, hashlib.md5(short).hexdigest(), print)
    assert not list(tmp_path.rglob(MARKER)) and not list(tmp_path.rglob("cifar10-train-*.tar"))


@pytest.mark.parametrize("ranges", [True, False], ids=["resumed", "server-without-ranges"])
def test_interrupted_download_resumes(archive, tmp_path, ranges):
    payload, md5, images, _ = archive
    cut = len(payload) // 3
    log: list[str] = []
    with ArchiveServer(payload, ranges=ranges, cut_after=cut) as server:
        with pytest.raises(DownloadError, match="interrupted.*rerun to resume"):
            ensure_cifar10(tmp_path, server.url, md5, log.append)
        part = next(tmp_path.glob("*.part"))
        assert part.stat().st_size == cut
        pattern = ensure_cifar10(tmp_path, server.url, md5, log.append)
    assert server.requests == [None, f"bytes={cut}-"]
    assert any(("resuming at" in line) == ranges and "downloading" in line for line in log[1:])
    assert ranges or any("ignored the resume request" in line for line in log)
    assert np.array_equal(_read_tars(Path(pattern).parent)[0], images)


def test_unreachable_server_is_a_download_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(DownloadError, match="cannot download"):
        ensure_cifar10(tmp_path, f"http://127.0.0.1:{port}/cifar-10-binary.tar.gz", "0" * 32, print)


def test_cached_archive_with_another_md5_is_refused_and_kept(archive, tmp_path):
    payload, md5, _, _ = archive
    cached = tmp_path / f"{md5[:12]}-cifar-10-binary.tar.gz"  # e.g. left by an interrupted run, or planted
    cached.write_bytes(payload[:-1] + b"x")
    with ArchiveServer(payload) as server, pytest.raises(DownloadError, match=rf"{cached}: md5 .* delete it"):
        ensure_cifar10(tmp_path, server.url, md5, print)
    assert server.requests == [] and cached.is_file() and not list(tmp_path.rglob("cifar10-train-*.tar"))


@pytest.mark.parametrize("md5", ["../../../tmp/x", "c32a1d4ab5d03f1284b67883e8d8753", "g" * 32, ""])
def test_md5_that_is_not_32_hex_digits_is_refused(tmp_path, md5):
    with pytest.raises(UserError, match="32 hex digits"):
        ensure_cifar10(tmp_path / "cache", "http://127.0.0.1:9/unused", md5, print)
    assert not (tmp_path / "cache").exists()


def test_member_larger_than_the_official_layout_is_refused(tmp_path):
    path = tmp_path / "big.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        info = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
        info.size = (10000 + 1) * 3073  # one record more than a CIFAR-10 batch: read whole, it would be converted
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    path.rename(tmp_path / f"{md5[:12]}-cifar-10-binary.tar.gz")  # in the cache, with its own md5
    with pytest.raises(UserError, match="data_batch_1.bin is 30733073 bytes, more than CIFAR-10's 30730000"):
        ensure_cifar10(tmp_path, "http://127.0.0.1:9/unused", md5, print)
