"""Ray Tune drivers for probes and fine-tuning; every trial is an MLflow run nested under the eval's run.

Trials are logged by ``MLflowLoggerCallback`` on the driver with the tag ``mlflow.parentRunId``
(the callback ends each run it starts; ``setup_mlflow`` inside a trainable has left runs stuck
RUNNING). Trial inputs travel through the Ray object store, so ``--ray-address`` clusters work;
the Tune storage path must then be shared by the nodes. Each trial leaves its predictions on the
eval split in a Tune checkpoint, from which the driver draws the confusion matrix.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import ray
import torch
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.schedulers import ASHAScheduler

from igpt.data_pipeline.progress import bar
from igpt.evals.baselines import PIXEL_LAYER
from igpt.evals.config import FinetuneSearch, ProbeSearch, Resources
from igpt.evals.finetune import FinetuneHistory, finetune
from igpt.evals.inputs import Layer, pick_device
from igpt.evals.probe import fit_probe, widen_l2
from igpt.evals.tracking import ParentRun
from igpt.pretrain.models import Model, build_model

PRED_FILE = "predictions.npy"


def ensure_ray(res: Resources, verbose: bool = False) -> None:
    """Connect to ``res.address`` or start a local Ray; reuse a session that is already up."""
    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.WARNING
    if not verbose:  # Ray's notice that token authentication is on (its default) shows with --verbose only
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    if res.address:
        ray.init(address=res.address, log_to_driver=False, logging_level=level)
    else:
        ray.init(num_cpus=res.num_cpus, include_dashboard=False, log_to_driver=False, logging_level=level)


def _report(metrics: dict[str, Any], pred: np.ndarray | None) -> None:
    """tune.report, with the predictions saved as the trial's checkpoint when given."""
    if pred is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        np.save(os.path.join(d, PRED_FILE), pred)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _load_pred(result: "tune.Result") -> np.ndarray | None:
    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as d:
        return np.load(os.path.join(d, PRED_FILE))


# ----------------------------------------------------------------------------- trainables
def probe_trial(config: dict[str, Any], features: dict[str, Any]) -> None:
    """One (layer, l2) cell: fit on train, report validation (and test) accuracy."""
    layer = config["layer"]
    x = {split: ray.get(ref) for split, ref in features["layers"][layer].items()}
    labels = features["labels"]
    device = pick_device("auto")
    probe = fit_probe(x["train"], labels["train"], config["l2"], features["num_classes"],
                      max_iter=features["max_iter"], device=device)
    val = probe.evaluate(torch.as_tensor(np.asarray(x["val"])), torch.as_tensor(labels["val"]))
    metrics = {"val_acc": val["accuracy"], "val_loss": val["loss"], "train_loss": probe.train_loss,
               "lbfgs_iterations": probe.iterations}
    eval_split = "test" if "test" in x else "val"
    if eval_split == "test":
        test = probe.evaluate(torch.as_tensor(np.asarray(x["test"])), torch.as_tensor(labels["test"]))
        metrics.update(test_acc=test["accuracy"], test_loss=test["loss"])
    pred = probe.predict(torch.as_tensor(np.asarray(x[eval_split]))).cpu().numpy()
    _report(metrics, pred)


def finetune_trial(config: dict[str, Any], inputs: dict[str, Any]) -> None:
    """One (lr, λ, epochs) cell: fine-tune a fresh copy of the checkpoint, reporting every epoch."""
    model = build_model(inputs["model_config"])
    model.load_state_dict(inputs["state_dict"])
    search: dict[str, Any] = inputs["search"]

    def on_epoch(metrics: dict[str, float], history: FinetuneHistory) -> None:
        improved = history.best_epoch == metrics["epoch"]
        _report({**metrics, "best_val_acc": history.best_val_acc}, history.best_val_pred if improved else None)

    finetune(
        model, inputs["train"], inputs["val"], inputs["num_classes"],
        lr=config["lr"], lam=config["lam"], max_epochs=config["epochs"], patience=search["patience"],
        batch_size=search["batch_size"], weight_decay=search["weight_decay"], device=pick_device("auto"),
        seed=search["seed"], on_epoch=on_epoch,
    )


# ----------------------------------------------------------------------------- drivers
TRIAL_KIND = {"raw_pixels": "pixels", "random_init": "random"}  # probe features other than the model's


def _short(value: Any) -> str:
    if isinstance(value, float) and value and abs(value) < 1e-2:
        return f"{value:.0e}".replace("e-0", "e-")  # 0.0001 -> 1e-4
    return f"{value:g}" if isinstance(value, float) else str(value)


def trial_name(kind: str, config: dict[str, Any]) -> str:
    """A trial's MLflow run name, under its eval's run in the UI's runs table, whose narrow name column
    keeps about 14 characters: the values first, then the kind of features if not the model's:
    ``L3 l2=0.01``, ``l2=1e-4 (pixels)``, ``L3 l2=1 (random)``, ``lr=3e-3 lam=0.5 epochs=2``."""
    parts = []
    for key, value in config.items():
        if key == "layer":
            parts += [] if value == PIXEL_LAYER else [f"L{value}"]
        else:
            parts.append(f"{key}={_short(value)}")
    return " ".join(parts + ([f"({kind})"] if kind else []))


def _grid_size(param_space: dict[str, Any]) -> int:
    return math.prod(len(v["grid_search"]) for v in param_space.values() if isinstance(v, dict) and "grid_search" in v)


def _trial_label(kind: str, trial: Any) -> str:
    return trial_name(kind, trial.config)


def _trial_dirname(prefix: str, trial: Any) -> str:
    return f"{prefix}_{trial.trial_id}"


class _TrialProgress(tune.Callback):
    """A progress bar over a grid's trials (Tune's own status tables are shown only with ``verbose``)."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self._bar = total, desc, None

    def __getstate__(self) -> dict[str, Any]:  # Tune saves its callbacks; the bar stays out
        return {**self.__dict__, "_bar": None}

    def setup(self, **info: Any) -> None:
        self._bar = bar(total=self.total, desc=self.desc, unit="trial")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._bar.update()

    on_trial_error = on_trial_complete

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._bar.close()


@contextlib.contextmanager
def _tune_console(verbose: bool) -> Iterator[None]:
    """Tune's tables and INFO lines go to stderr with ``verbose`` and nowhere without (stdout stays for the
    summary); trial errors still surface, as the exception ``_run`` raises."""
    if verbose:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    logger = logging.getLogger("ray.tune")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            yield
    finally:
        logger.setLevel(level)


def _run(
    trainable: Any, param_space: dict[str, Any], *, res: Resources, parent: ParentRun, tracking_uri: str,
    storage_path: str | Path, name: str, scheduler: Any = None, checkpoint_score: str | None = None,
    tags: dict[str, str] | None = None, kind: str = "", verbose: bool = False,
) -> tune.ResultGrid:
    """Run the Tune grid ``name``; trials are named by ``trial_name(kind, config)`` (directories
    ``{name}_{trial_id}``) and their MLflow runs carry ``tags``; Tune's console output only with ``verbose``."""
    ensure_ray(res, verbose)
    # Every trial keeps one checkpoint, which forces a snapshot of the (local) experiment state each
    # time; Tune then warns once per trial that snapshots are frequent. Harmless here, so quiet it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = tune.with_resources(trainable, {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})
    callback = MLflowLoggerCallback(
        tracking_uri=tracking_uri, experiment_name=parent.experiment_name, tags={**parent.child_tags, **(tags or {})}
    )
    checkpoint_config = tune.CheckpointConfig(
        num_to_keep=1, checkpoint_score_attribute=checkpoint_score, checkpoint_score_order="max"
    )
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric="val_acc", mode="max", scheduler=scheduler, max_concurrent_trials=res.max_concurrent_trials,
            trial_name_creator=functools.partial(_trial_label, kind),
            trial_dirname_creator=functools.partial(_trial_dirname, name),
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=str(Path(storage_path).resolve()), verbose=0,
            callbacks=[callback, _TrialProgress(_grid_size(param_space), f"{name} trials")],
            checkpoint_config=checkpoint_config, failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    with _tune_console(verbose):
        grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(grid)} Tune trials failed; first error: {errors[0]}")
    return grid


def tune_probe(
    features: dict[Layer, dict[str, np.ndarray]], labels: dict[str, np.ndarray], num_classes: int,
    layers: list[Layer], search: ProbeSearch, res: Resources, *, parent: ParentRun, tracking_uri: str,
    storage_path: str | Path, features_name: str = "model", verbose: bool = False,
) -> list[dict[str, Any]]:
    """Run the layers × L2 grid, then widen each layer's grid while its best L2 lies at an edge
    (``igpt.evals.probe.widen_l2``, at most ``search.widen`` rounds, one Tune grid per new value); returns one
    row per trial (config, metrics, eval predictions). A layer is a block index or the label of a
    concatenation of several (``concat_label``).

    ``features_name`` tells feature sets apart within one parent run: Tune experiment ``probe`` (model
    features) or ``probe_<features_name>`` (``_widenR`` appended for the widening rounds), MLflow tag
    ``probe_features``, trial names (``trial_name``).
    """
    ensure_ray(res, verbose)
    payload = {
        "layers": {l: {s: ray.put(np.ascontiguousarray(x)) for s, x in features[l].items()} for l in layers},
        "labels": labels, "num_classes": num_classes, "max_iter": search.max_iter,
    }
    name = "probe" if features_name == "model" else f"probe_{features_name}"
    run = functools.partial(
        _run, tune.with_parameters(probe_trial, features=payload), res=res, parent=parent, tracking_uri=tracking_uri,
        storage_path=storage_path, tags={"probe_features": features_name}, kind=TRIAL_KIND.get(features_name, ""),
        verbose=verbose)
    rows = _probe_rows(run({"layer": tune.grid_search(layers), "l2": tune.grid_search(list(search.l2))}, name=name))
    for round_ in range(1, search.widen + 1):
        wider: dict[float, list[Layer]] = {}
        for layer in layers:
            nxt = widen_l2({r["config"]["l2"]: r["metrics"]["val_acc"] for r in rows if r["config"]["layer"] == layer})
            if nxt is not None:
                wider.setdefault(nxt, []).append(layer)
        for i, (l2, group) in enumerate(sorted(wider.items())):
            rows += _probe_rows(run({"layer": tune.grid_search(group), "l2": tune.grid_search([l2])},
                                    name=f"{name}_widen{round_}" + (f"_{i}" if i else "")))
        if not wider:
            break
    return rows


def _probe_rows(grid: tune.ResultGrid) -> list[dict[str, Any]]:
    return [{"config": dict(r.config), "metrics": dict(r.metrics), "pred": _load_pred(r)} for r in grid]


def tune_finetune(
    model: Model, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int, search: FinetuneSearch, res: Resources, *, parent: ParentRun, tracking_uri: str,
    storage_path: str | Path, verbose: bool = False,
) -> list[dict[str, Any]]:
    """Run the lr × λ × epochs grid under ASHA; returns one row per trial (config, last metrics, best preds)."""
    inputs = {
        "model_config": model.cfg,  # as is: a release's is the config's ModelSection (an IGPTConfig with a preset)
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "train": (train[0].to(torch.int16), train[1]), "val": (val[0].to(torch.int16), val[1]),
        "num_classes": num_classes, "search": asdict(search),
    }
    scheduler = ASHAScheduler(
        time_attr="training_iteration", max_t=max(search.epochs), grace_period=search.grace_period,
        reduction_factor=search.reduction_factor,
    )
    grid = _run(
        tune.with_parameters(finetune_trial, inputs=inputs),
        {"lr": tune.grid_search(list(search.lr)), "lam": tune.grid_search(list(search.lam)),
         "epochs": tune.grid_search(list(search.epochs))},
        res=res, parent=parent, tracking_uri=tracking_uri, storage_path=storage_path, name="finetune",
        scheduler=scheduler, checkpoint_score="best_val_acc", verbose=verbose,
    )
    rows = []
    for r in grid:
        history = r.metrics_dataframe
        rows.append({
            "config": dict(r.config), "metrics": dict(r.metrics), "pred": _load_pred(r),
            "val_acc_per_epoch": history["val_acc"].tolist() if history is not None else [],
        })
    return rows
