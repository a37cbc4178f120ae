"""MLflow helpers for evals: one parent run per eval, Tune trials nested under it.

Trials are logged by Ray Tune's ``MLflowLoggerCallback`` on the driver (it ends every run it
starts, so no run is left RUNNING); they are nested by giving each the tag
``mlflow.parentRunId`` = the parent's run id, and named by their grid values (``probe layer=3 l2=0.01``),
so the UI lists them under their eval's run. Experiments are created by ``igpt.pretrain.mlflow_store``
(artifacts beside a sqlite store, the UI's model-training view).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from igpt.pretrain.mlflow_store import experiment_id


def default_tracking_uri(out_dir: str | Path) -> str:
    """A sqlite store in ``out_dir`` (the project's default: a sqlite file beside the outputs)."""
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


class ParentRun:
    """A handle on the parent run: params, metrics, JSON and image artifacts."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_name: str):
        self.client = client
        self.run_id = run_id
        self.experiment_name = experiment_name

    @property
    def child_tags(self) -> dict[str, str]:
        """Tags that nest a trial run under this run."""
        return {MLFLOW_PARENT_RUN_ID: self.run_id}

    def log_params(self, params: dict[str, Any]) -> None:
        for k, v in params.items():
            self.client.log_param(self.run_id, k, str(v)[:6000])

    def log_metrics(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.client.log_metric(self.run_id, k, float(v))

    def log_json(self, obj: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, name)
            with open(path, "w") as f:
                json.dump(obj, f, indent=2)
            self.client.log_artifact(self.run_id, path)

    def log_file(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))


@contextmanager
def parent_run(tracking_uri: str, experiment_name: str, run_name: str) -> Iterator[ParentRun]:
    """Create a parent run; it ends FINISHED on success and FAILED if the body raises."""
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.create_run(experiment_id(client, experiment_name, tracking_uri), tags={MLFLOW_RUN_NAME: run_name})
    handle = ParentRun(client, run.info.run_id, experiment_name)
    try:
        yield handle
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
