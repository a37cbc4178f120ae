"""Hostile inputs to the data pipeline: tar headers that would loop or move backwards, JPEG headers that claim
huge sizes; refused quickly, with bounded memory, as the documented errors (and a seeded fuzz of both)."""
from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from igpt.data_pipeline.decode import SkipImage, decode_image
from igpt.data_pipeline.manifest import Manifest
from igpt.data_pipeline.palette import save_palette, uniform9_palette
from igpt.data_pipeline.shard import shard_dataset
from igpt.data_pipeline.sources import find_images
from igpt.data_pipeline.tario import BLOCK, TarFormatError, iter_members, tar_bytes

REPO = Path(__file__).resolve().parent.parent


class Hang(BaseException):
    """Raised by ``within`` when time is up (a BaseException: no ``except Exception``/``OSError`` swallows it)."""


@contextlib.contextmanager
def within(seconds: float):
    """Fail the test with Hang if the block runs longer than ``seconds``."""
    def hang(*_: object) -> None:
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _header(name: str, size: bytes, kind: bytes = b"0") -> bytes:
    """A ustar header with a raw size field and a correct checksum."""
    h = bytearray(tarfile.TarInfo(name).tobuf(format=tarfile.USTAR_FORMAT))
    h[124:136] = size.ljust(12, b"\0")
    h[156:157] = kind
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _pax(payload: bytes) -> bytes:
    return _header("././@PaxHeader", b"%011o" % len(payload), b"x") + payload.ljust(BLOCK, b"\0")


def _jpeg_header(w: int, h: int) -> bytes:
    """SOI, a baseline 8-bit 3-component SOF claiming w x h, EOI: 23 bytes, no image data."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, h, w, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + sof + b"\xff\xd9"


EVIL = {  # the bad header, as the member it names
    "negative-size": (_header("evil.jpg", b"-1000"), "evil.jpg"),
    "non-numeric-size": (_header("evil.jpg", b"12z4"), "evil.jpg"),
    "pax-record-length-0": (_pax(b"0 path=evil.jpg\n") + _header("evil.jpg", b"0"), "././@PaxHeader"),
    "pax-record-past-header": (_pax(b"900 path=evil.jpg\n") + _header("evil.jpg", b"0"), "././@PaxHeader"),
    "pax-negative-size": (_pax(b"14 size=-2048\n") + _header("evil.jpg", b"0"), "././@PaxHeader"),
}


def _jpeg(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), rgb).save(buf, "JPEG")
    return buf.getvalue()


def _evil_tar(path: Path, evil: bytes) -> Path:
    """Two good labelled samples and a header bomb (a JPEG claiming 65535 x 2731 pixels), then ``evil``."""
    good = [("a.jpg", _jpeg((200, 0, 0))), ("a.cls", b"1"), ("b.jpg", _jpeg((0, 0, 200))), ("b.cls", b"2"),
            ("bomb.jpg", _jpeg_header(65535, 2731)), ("bomb.cls", b"3")]
    path.write_bytes(tar_bytes(good)[: -2 * BLOCK] + evil + b"\0" * 2 * BLOCK)
    return path


@pytest.mark.parametrize("case", list(EVIL))
def test_reader_refuses_bad_sizes_and_pax_records_at_once(case):
    evil, member = EVIL[case]
    with within(1), pytest.raises(TarFormatError, match=f"member '{member}'") as err:
        list(iter_members(evil + b"\0" * 2 * BLOCK, "evil.tar"))
    assert "\n" not in str(err.value)


def test_sharder_skips_a_bad_tar_and_a_header_bomb_with_reasons(tmp_path):
    tar = _evil_tar(tmp_path / "evil.tar", EVIL["pax-record-length-0"][0])
    with within(1):
        found = find_images([str(tar)])
    assert [s.reason for s in found.skipped] == ["bad-tar"] and "././@PaxHeader" in found.skipped[0].detail
    palette = tmp_path / "palette.npy"
    save_palette(uniform9_palette(), palette)
    with within(30):
        m = shard_dataset([str(tar)], tmp_path / "out", palette, resolution=4, num_workers=1, progress=False)
    # a and b are kept; the sample being read when the tar broke (bomb) goes with the rest of the tar
    assert m.split("train").num_samples == 2 and m.skipped_counts == {"bad-tar": 1} and m.num_inputs == 3
    with within(30):  # without the bad header the bomb is read, and skipped as too large
        m = shard_dataset([str(_evil_tar(tmp_path / "bomb.tar", b""))], tmp_path / "out2", palette, resolution=4,
                          num_workers=1, progress=False)
    assert m.split("train").num_samples == 2 and m.skipped_counts == {"too-large": 1} and m.labelled


def _python(script: str, timeout: float) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter; its whole process group (DataLoader workers too) ends with it."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_loader_refuses_a_bad_shard_in_one_line(cifar_tokens, tmp_path):
    data = shutil.copytree(cifar_tokens, tmp_path / "tokens")
    for shard in Manifest.load(data).split("train").shards:
        (data / shard.file).write_bytes(EVIL["negative-size"][0] + b"\0" * 2 * BLOCK)
    # raised in the DataLoader worker, surfaced in the training process as its own one-line error
    proc = _python(f"""
        from igpt.data_pipeline.loader import TokenStream
        from igpt.data_pipeline.tario import TarFormatError
        try:
            next(iter(TokenStream({str(data)!r}, "train", 8, num_workers=1)))
        except TarFormatError as e:
            print(repr(str(e)))
    """, 60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message = ast.literal_eval(proc.stdout)
    assert re.fullmatch(r".*train-\d+\.tar: member 'evil.jpg' at byte 0: bad size field \(.*\)", message), message


def test_jpeg_header_claiming_65535_squared_is_refused_unallocated():
    with pytest.raises(SkipImage) as err:
        decode_image(_jpeg_header(65535, 65535), 8)
    assert err.value.reason == "too-large"
    # in a fresh process that imports only the decoder: the 65535² header and one just over Pillow's limit (the
    # limit on the address space only keeps a regression from taking the machine's memory). The peak is VmHWM, not
    # ru_maxrss: Linux carries the forking parent's peak (pytest's, torch loaded) into ru_maxrss across exec.
    proc = _python(f"""
        import re, resource
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from igpt.data_pipeline.decode import SkipImage, decode_image
        for data in ({_jpeg_header(65535, 65535)!r}, {_jpeg_header(65535, 2731)!r}):
            try:
                decode_image(data, 8)
            except SkipImage as e:
                print(e.reason)
        print(int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) // 1024)
    """, 60)
    assert proc.returncode == 0, proc.stderr
    *reasons, peak_mb = proc.stdout.split()
    assert reasons == ["too-large", "too-large"] and int(peak_mb) < 300, proc.stdout


FUZZ = """
    import io, json, random, resource, tarfile
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from PIL import Image
    from igpt.data_pipeline.decode import SkipImage, decode_image
    from igpt.data_pipeline.tario import TarFormatError, iter_members, tar_bytes

    rng = random.Random(20240611)
    FIELDS = [b"-1000", b"0", b"7777777777", b"\\x80" + b"\\0" * 10 + b"\\x05", b"\\xff" * 12, b"1 ", b"+1", b"8"]

    def checksum(h):
        h[148:156] = b" " * 8
        h[148:156] = b"%06o\\0 " % sum(h[:512])

    def tar_case():
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=rng.choice([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])) as tf:
            for i in range(3):
                info = tarfile.TarInfo("d/" + "n" * rng.choice([5, 120]) + f"{i}.jpg")
                info.size = rng.randrange(0, 700)
                tf.addfile(info, io.BytesIO(bytes(info.size)))
        b = bytearray(buf.getvalue())
        for _ in range(rng.randrange(1, 6)):
            pos = rng.randrange(0, min(len(b), 3000))
            if rng.random() < 0.3:  # a whole numeric field, or a pax record length
                field = rng.choice(FIELDS)
                b[pos : pos + len(field)] = field
            else:
                b[pos] = rng.randrange(256)
        if rng.random() < 0.7:
            checksum(b)  # the first header must pass its checksum to reach the interesting code
        return bytes(b[: rng.choice([len(b), rng.randrange(len(b))])])

    def jpeg_case(seeds):
        b = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 5)):
            b[rng.randrange(0, min(len(b), 700))] = rng.randrange(256)
        sof = max(b.find(b"\\xff\\xc0"), b.find(b"\\xff\\xc2")) if rng.random() < 0.5 else -1
        if sof >= 0:  # the claimed size: anything a header can say
            b[sof + 5 : sof + 9] = rng.randrange(1 << 32).to_bytes(4, "big")
        return bytes(b[: rng.choice([len(b), rng.randrange(len(b))])])

    seeds = []
    for kw in ({}, {"progressive": True}, {"subsampling": 0}):
        buf = io.BytesIO()
        Image.new("RGB", (40, 24), (20, 140, 90)).save(buf, "JPEG", **kw)
        seeds.append(buf.getvalue())
    counts = {"tar-ok": 0, "tar-refused": 0, "jpeg-ok": 0}
    for _ in range(1500):
        try:
            for _ in iter_members(tar_case()):
                pass
            counts["tar-ok"] += 1
        except TarFormatError:
            counts["tar-refused"] += 1
    for _ in range(400):
        try:
            decode_image(jpeg_case(seeds), 8)
            counts["jpeg-ok"] += 1
        except SkipImage as e:
            counts[e.reason] = counts.get(e.reason, 0) + 1
    print(json.dumps(counts))
"""


def test_fuzzed_tar_and_jpeg_headers_never_hang_overallocate_or_raise_the_unexpected():
    proc = _python(FUZZ, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout)
    assert counts["tar-ok"] > 50 and counts["tar-refused"] > 50 and counts["jpeg-ok"] > 30, counts
    assert set(counts) <= {"tar-ok", "tar-refused", "jpeg-ok", "empty-file", "not-an-image", "truncated", "corrupt",
                           "too-large", "unsupported-mode"}, counts
