"""Durability of writes: data reaches the disk (fsync) before the rename that publishes it, the directory after
it, and what marks something done (a shard's record, a checkpoint's marker) only after what it marks."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igpt.data_pipeline import io
from igpt.data_pipeline.palette import save_palette, uniform9_palette
from igpt.data_pipeline.shard import RECORDS_DIR, shard_dataset
from igpt.pretrain.checkpoint import MARKER, write_marker


@pytest.fixture
def events(monkeypatch) -> list[tuple[str, str]]:
    """("fsync", path) for every os.fsync and ("replace", destination) for every os.replace, in order."""
    seen: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst) -> None:
        seen.append(("replace", str(Path(dst).resolve())))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return seen


def _helpers(tmp: Path) -> dict:
    (tmp / "src.bin").write_bytes(b"source")

    def external_writer(path: Path) -> None:  # a writer with its own file object (np.save, torch.save, PIL)
        with io.atomic_path(path) as t, open(t, "wb") as f:
            f.write(b"x" * 10)

    return {"write_bytes_atomic": lambda p: io.write_bytes_atomic(b"data", p),
            "write_text_atomic": lambda p: io.write_text_atomic("text", p),
            "write_json_atomic": lambda p: io.write_json_atomic({"a": 1}, p),
            "copy_atomic": lambda p: io.copy_atomic(tmp / "src.bin", p),
            "atomic_path": external_writer}


@pytest.mark.parametrize("helper", ["write_bytes_atomic", "write_text_atomic", "write_json_atomic", "copy_atomic",
                                    "atomic_path"])
def test_atomic_file_helpers_fsync_the_data_before_the_rename_and_the_directory_after(helper, tmp_path, events):
    dest = (tmp_path / "out" / "file.dat")
    dest.parent.mkdir()
    _helpers(tmp_path)[helper](dest)
    dest = str(dest.resolve())
    replaced = events.index(("replace", dest))
    before, after = events[:replaced], events[replaced + 1:]
    data_fsyncs = [p for kind, p in before if kind == "fsync" and Path(p).parent == Path(dest).parent]
    assert len(data_fsyncs) == 1 and Path(data_fsyncs[0]).name.startswith(".file.tmp"), events  # the temporary
    assert ("fsync", str(Path(dest).parent)) in after, events


def test_atomic_dir_fsyncs_every_file_and_folder_before_the_rename_and_the_parent_after(tmp_path, events):
    dest = tmp_path / "release"
    with io.atomic_dir(dest) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub" / "b.bin").write_bytes(b"b")
        tmp_dir = str(tmp.resolve())
    replaced = events.index(("replace", str(dest.resolve())))
    synced = {p.replace(tmp_dir, "TMP") for kind, p in events[:replaced] if kind == "fsync"}
    assert synced == {"TMP", "TMP/sub", "TMP/a.bin", "TMP/sub/b.bin"}, events
    assert events[replaced + 1:] == [("fsync", str(tmp_path.resolve()))]


def test_checkpoint_marker_is_written_after_every_file_of_the_tag_is_fsynced(tmp_path, events):
    tag = tmp_path / "step_00000001"
    (tag / "zero").mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    (tag / "zero" / "optim_states.pt").write_bytes(b"o" * 100)
    write_marker(tag, {"step": 1})
    marker = events.index(("replace", str((tag / MARKER).resolve())))
    synced = {p for kind, p in events[:marker] if kind == "fsync"}
    root = tag.resolve()
    assert {str(root / "mp_rank_00_model_states.pt"), str(root / "zero" / "optim_states.pt"),
            str(root / "zero"), str(root)} <= synced, events


def test_shard_record_is_written_only_after_its_tar_is_durable(tmp_path, monkeypatch):
    palette = tmp_path / "palette.npy"
    save_palette(uniform9_palette(), palette)
    for i in range(3):
        Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(tmp_path / f"img{i}.png")
    out = (tmp_path / "out").resolve()
    seen: list[tuple[str, bool]] = []  # (fsynced or renamed-to path, whether a record of the shard existed by then)
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        seen.append((os.readlink(f"/proc/self/fd/{fd}"), any((out / RECORDS_DIR).glob("*train-000000*"))))
        fsync(fd)

    def recording_replace(src, dst) -> None:
        seen.append((str(dst), any((out / RECORDS_DIR).glob("*train-000000*"))))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    shard_dataset([str(tmp_path / "img*.png")], out, palette, resolution=4, num_workers=0, progress=False)
    paths = [p for p, _ in seen]
    tar = next(i for i, p in enumerate(paths) if Path(p).parent == out and ".train-000000.tmp" in Path(p).name)
    directory = paths.index(str(out), tar)  # the tar's name in its directory
    record = next(i for i, p in enumerate(paths) if Path(p).parent == out / RECORDS_DIR and "train-000000" in p)
    assert tar < directory < record, seen
    assert not any(existed for _, existed in seen[: directory + 1]), seen
