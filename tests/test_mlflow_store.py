"""MLflow experiments: artifacts beside a sqlite store (not in ./mlruns), the UI's model-training view."""
from __future__ import annotations

from igpt.pretrain.mlflow_store import EXPERIMENT_KIND_TAG, TRAINING_KIND, artifact_location, experiment_id


def test_artifact_location_only_for_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert artifact_location(f"sqlite:///{tmp_path}/x/mlflow.db") == (tmp_path / "x" / "mlartifacts").as_uri()
    assert artifact_location("sqlite:///rel/m.db?timeout=5") == (tmp_path / "rel" / "mlartifacts").as_uri()
    for uri in ("http://127.0.0.1:5000", "https://mlflow.example.org", "databricks", "postgresql://h/db",
                "sqlite:///:memory:"):
        assert artifact_location(uri) is None  # the server or database decides


def test_eval_artifacts_land_beside_the_store_and_experiments_open_as_training(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from igpt.evals.tracking import parent_run

    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    (tmp_path / "note.txt").write_text("hello")
    with parent_run(uri, "igpt-eval", "nll") as parent:
        parent.log_file(tmp_path / "note.txt")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("igpt-eval")
    assert exp.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    assert exp.artifact_location == (store / "mlartifacts").as_uri()
    assert list((store / "mlartifacts").glob("*/artifacts/note.txt"))
    assert not (tmp_path / "mlruns").exists()

    legacy = client.create_experiment("made-elsewhere")  # no kind: marked as model training on first use
    assert experiment_id(client, "made-elsewhere", uri) == legacy
    assert client.get_experiment(legacy).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    assert "/mlruns/" in client.get_experiment(legacy).artifact_location  # an existing location stays
