"""MLflow experiments of this project: artifacts beside a sqlite store, and the UI's training view.

With a sqlite store ``sqlite:///DIR/mlflow.db`` every experiment created here keeps its
artifacts in ``DIR/mlartifacts`` (MLflow's client would otherwise put them in ``./mlruns`` of
whatever directory the process runs in). A tracking server or another database keeps its own
artifact settings. Experiments carry ``mlflow.experimentKind = custom_model_development``, so
the UI opens them in its model-training view (runs, charts, nested trials), not the GenAI one.
MLflow itself is imported by the caller: this module stays importable without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
ARTIFACTS_DIR = "mlartifacts"
_SQLITE = "sqlite:///"


def artifact_location(tracking_uri: str) -> str | None:
    """``DIR/mlartifacts`` (a file URI) for ``sqlite:///DIR/NAME.db``; None (the store decides) otherwise."""
    if not tracking_uri.startswith(_SQLITE):
        return None
    db = tracking_uri[len(_SQLITE):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / ARTIFACTS_DIR).as_uri()


def experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name`` on ``client`` (an MlflowClient for ``tracking_uri``), created if absent
    with its artifact location; an existing one without an experiment kind is marked as model training."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(tracking_uri),
                                            tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
        except MlflowException:  # created meanwhile by another process (a parallel eval, another rank)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return exp.experiment_id
