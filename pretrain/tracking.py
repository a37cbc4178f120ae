"""Tracking for a training run (rank 0 only) and the throughput / MFU arithmetic.

``logging.backend`` picks the tracker: ``mlflow`` (the default) or ``jsonl``, plain files for
machines without MLflow: ``RUN_DIR/tracking/`` holds ``params.json``, ``metrics.jsonl`` (one line per
logging call: step, time and the metrics), ``tags.json``, ``status`` and the PNG artifacts.

With a sqlite MLflow store (the default ``sqlite:///RUN_DIR/mlflow.db``, or any ``logging.tracking_uri=sqlite:///DIR/…``)
artifacts go to ``mlartifacts/`` beside the database (see igpt.pretrain.mlflow_store).

One MLflow run per training run: its id is kept in ``RUN_DIR/mlflow_run_id`` so a resumed run
logs into the same MLflow run. The tracking URI defaults to ``sqlite:///RUN_DIR/mlflow.db``; any
URI (a server, another file) can be given as ``logging.tracking_uri``.

MFU (model FLOPs utilisation) = achieved model FLOP/s per device / peak FLOP/s per device, where
achieved = tokens/s (all ranks) × ``model.flops_per_token()`` (6·N + 12·L·T·d, forward + backward,
no activation-recomputation credit) / world size. The peak per device comes from PEAK_TFLOPS
(dense bf16 tensor-core figures) or ``logging.peak_tflops``.
"""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from igpt.data_pipeline.grid import save_png
from igpt.data_pipeline.io import write_json_atomic, write_text_atomic
from igpt.errors import UserError
from igpt.pretrain.config import TrainConfig, flatten, to_dict
from igpt.pretrain.mlflow_store import experiment_id

# Dense bf16 peak per device (no sparsity), matched by substring of torch.cuda.get_device_name().
# The CPU entry is a nominal placeholder: set logging.peak_tflops for a figure that means something.
PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "cpu": 1.0,
}

RUN_ID_FILE = "mlflow_run_id"


def device_label(device: str) -> str:
    """A name for ``device`` (cpu|cuda): the CUDA device name, or ``cpu``."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return "cpu"


def peak_flops(device: str, override_tflops: float | None = None) -> float:
    """Peak FLOP/s of one device: ``override_tflops`` if given, else the PEAK_TFLOPS entry for it."""
    if override_tflops is not None:
        return override_tflops * 1e12
    label = device_label(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key.lower() in label.lower():
            return tflops * 1e12
    raise UserError(f"no peak-FLOPs entry for device {label!r}; set logging.peak_tflops")


def mfu(tokens_per_s: float, flops_per_token: float, world_size: int, peak: float) -> float:
    """Model FLOPs utilisation in [0, 1] (see the module docstring)."""
    return tokens_per_s * flops_per_token / world_size / peak


def memory_gb(device: str) -> float:
    """Peak memory: CUDA allocated on GPU, the process's peak resident set on CPU (GB).

    On Linux the CPU figure is VmHWM, which starts afresh at exec; ``ru_maxrss`` (the fallback
    elsewhere) keeps the peak of the process that spawned us, e.g. a large pytest or launcher.
    """
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 1e9
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def open_tracker(cfg: TrainConfig, run_dir: str | os.PathLike, rank: int) -> "MlflowTracker | JsonlTracker":
    """The tracker ``logging.backend`` names, for ``run_dir``; its methods are no-ops off rank 0."""
    backend = {"mlflow": MlflowTracker, "jsonl": JsonlTracker}[cfg.logging.backend]
    return backend(cfg, run_dir, rank)


class MlflowTracker:
    """The MLflow run of one training run; every method is a no-op on ranks other than 0."""

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, rank: int) -> None:
        self.enabled = rank == 0
        self.run_id: str | None = None
        if not self.enabled:
            return
        run_dir = Path(run_dir).resolve()
        uri = cfg.logging.tracking_uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        from mlflow.tracking import MlflowClient  # imported here: GPU boxes without MLflow still benchmark

        self.client = MlflowClient(tracking_uri=uri)
        id_file = run_dir / RUN_ID_FILE
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        exp_id = experiment_id(self.client, cfg.logging.experiment, uri)  # artifacts beside a sqlite store
        tags = {"run_dir": str(run_dir)}
        if os.environ.get("SLURM_JOB_ID"):
            tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        run = self.client.create_run(exp_id, run_name=cfg.logging.run_name or run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        params = {k: str(v)[:6000] for k, v in flatten(to_dict(cfg)).items()}
        items = list(params.items())
        from mlflow.entities import Param

        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        write_text_atomic(self.run_id, id_file)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """Log a uint8 (H, W, 3) array as a PNG artifact, e.g. ``samples/step_000100_uncond.png``."""
        if self.enabled:
            self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def close(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED (preempted runs are KILLED until resumed)."""
        if self.enabled:
            self.client.set_terminated(self.run_id, status=status)


METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """The lines of a ``metrics.jsonl`` (``JsonlTracker``'s ``RUN_DIR/tracking/metrics.jsonl``, or a copy)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def training_windows(rows: list[dict[str, float]], tokens_per_step: int) -> list[tuple[int, float]]:
    """(steps, seconds) of each logged training window, in order: the lines with ``tokens_per_s`` (their
    seconds leave out validation and checkpoints)."""
    windows, last = [], 0
    for row in rows:
        if "tokens_per_s" in row:
            steps = int(row["step"]) - last
            windows.append((steps, steps * tokens_per_step / row["tokens_per_s"]))
            last = int(row["step"])
    return windows


class JsonlTracker:
    """The same calls as MlflowTracker, written as plain files under ``RUN_DIR/tracking/``.

    A resumed run appends to the same files, like a resumed MLflow run."""

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, rank: int) -> None:
        self.enabled = rank == 0
        self.root = Path(run_dir).resolve() / "tracking"
        if not self.enabled:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        params = self.root / "params.json"
        if not params.is_file():
            write_json_atomic({k: str(v) for k, v in flatten(to_dict(cfg)).items()}, params)
        self._write_status("RUNNING")

    def _write_status(self, status: str) -> None:
        write_text_atomic(status + "\n", self.root / "status")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.enabled:
            line = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
            with open(self.root / METRICS_FILE, "a") as f:
                f.write(json.dumps(line) + "\n")

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """Save a uint8 (H, W, 3) array as ``tracking/artifacts/ARTIFACT_FILE`` (a PNG)."""
        if self.enabled:
            path = self.root / "artifacts" / artifact_file
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(image, path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            path = self.root / "tags.json"
            current = json.loads(path.read_text()) if path.is_file() else {}
            write_json_atomic({**current, **{k: str(v) for k, v in tags.items()}}, path)

    def close(self, status: str = "FINISHED") -> None:
        """Record FINISHED, FAILED or KILLED in ``tracking/status``."""
        if self.enabled:
            self._write_status(status)
