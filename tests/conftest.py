"""Shared test set-up: CPU environment for DeepSpeed and Triton's interpreter, shared data paths."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Triton kernels must see TRITON_INTERPRET before they are defined; DeepSpeed must see its accelerator.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

REPO_ROOT = Path(__file__).resolve().parent.parent
CIFAR_DIR = REPO_ROOT.parent / "shared" / "data" / "cifar10-train"


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The raw-image CIFAR-10 WebDataset shards shipped in ../shared."""
    if not CIFAR_DIR.is_dir():
        pytest.fail(f"CIFAR-10 shards not found at {CIFAR_DIR}")
    return CIFAR_DIR
