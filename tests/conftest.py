"""Shared test set-up: CPU environment for DeepSpeed and Triton's interpreter, the CIFAR-10 sample shipped in tests/data."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Triton kernels must see TRITON_INTERPRET before they are defined; DeepSpeed must see its accelerator.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a stray ~/.ray/auth_token must not break local test clusters
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

REPO_ROOT = Path(__file__).resolve().parent.parent
# The first 4,000 samples of ../shared's CIFAR-10 train shards (scripts/make_cifar10_sample.py), so that
# the tests run in any clone; the tests that would need all 50,000 images have been sized to the sample.
CIFAR_SAMPLE = Path(__file__).resolve().parent / "data" / "cifar10-sample.tar.gz"


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """A folder with ``cifar10-train-000000.tar``: the CIFAR-10 sample as a raw-image WebDataset tar
    (``KEY.jpg`` + ``KEY.cls``, 4,000 samples, shuffled classes), unpacked from tests/data."""
    out = tmp_path_factory.mktemp("cifar10")
    with gzip.open(CIFAR_SAMPLE) as src, open(out / "cifar10-train-000000.tar", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_token_dir(root: Path, cifar_dir: Path, resolution: int, margin: int = 0) -> Path:
    """First 2,500 CIFAR-10 images as uniform9 token shards of 100 (~23 train, ~3 val), 10% val."""
    from igpt.data_pipeline.palette import save_palette, uniform9_palette
    from igpt.data_pipeline.shard import shard_dataset

    palette = root / "palette" / "palette.npy"
    if not palette.exists():
        save_palette(uniform9_palette(), palette)
    out = root / (f"tokens{resolution}" + (f"m{margin}" if margin else ""))
    shard_dataset([str(cifar_dir / "cifar10-train-000000.tar")], out, palette, resolution=resolution,
                  val_fraction=0.1, shard_size=100, num_workers=2, limit=2500, class_names=CIFAR_CLASSES,
                  progress=False, margin=margin)
    return out


@pytest.fixture(scope="session")
def cifar_tokens(tmp_path_factory, cifar_dir) -> Path:
    """Token-shard dir (manifest.json, palette.npy) of 2,500 CIFAR-10 images at 16x16, uniform9 palette,
    splits train (~2,250 samples, ~23 shards) and val (~250, 3 shards), labelled with class names."""
    return _cifar_token_dir(tmp_path_factory.getbasetemp() / "cifar_tokens", cifar_dir, 16)


@pytest.fixture(scope="session")
def cifar_tokens32(tmp_path_factory, cifar_dir) -> Path:
    """As ``cifar_tokens`` at 32x32 (1,024 tokens per sample)."""
    return _cifar_token_dir(tmp_path_factory.getbasetemp() / "cifar_tokens", cifar_dir, 32)


@pytest.fixture(scope="session")
def cifar_tokens_margin(tmp_path_factory, cifar_dir) -> Path:
    """As ``cifar_tokens`` (the same images and splits) with the train split stored at 20x20 (margin 4) for
    random 16x16 crops; val stays at 16x16."""
    return _cifar_token_dir(tmp_path_factory.getbasetemp() / "cifar_tokens", cifar_dir, 16, margin=4)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray session of 2 CPUs for a test module (Ray Tune's probe and fine-tune trials)."""
    import ray

    if ray.is_initialized():  # another module's session: use it, leave it to its owner
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@dataclass
class QuickDemo:
    """``igpt demo --quick`` in ``work``, run once by the ``quick_demo`` fixture (``first``); ``run()`` reruns it."""

    work: Path
    args: list[str]
    first: subprocess.CompletedProcess

    def run(self) -> subprocess.CompletedProcess:
        return _run_demo(self.args)


def _run_demo(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", "import sys; from igpt.cli import main; sys.exit(main())", "demo",
                           "--quick", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def quick_demo(cifar_dir, tmp_path_factory) -> QuickDemo:
    """The shortened main job, on CIFAR-10 downloaded from a local HTTP server: an archive in the official
    binary format made from the sample (so no ../shared and no internet are involved)."""
    from cifar_archive import ArchiveServer, sample_images, write_archive

    root = tmp_path_factory.mktemp("quick_demo")
    images, labels = sample_images(cifar_dir / "cifar10-train-000000.tar", 4000)
    md5 = write_archive(root / "cifar-10-binary.tar.gz", images, labels)
    with ArchiveServer((root / "cifar-10-binary.tar.gz").read_bytes()) as server:
        args = ["--workdir", str(root / "work"), "--data-url", server.url, "--data-md5", md5,
                "--data-cache", str(root / "cache")]
        first = _run_demo(args)
    return QuickDemo(root / "work", args, first)
