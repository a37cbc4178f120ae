"""The four evals end to end: load and check inputs, compute, log to MLflow, return the summary
(``igpt.evals.summaries``; written as ``OUT/summary.json``). Their options are ``igpt.evals.config``'s."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from igpt.data_pipeline.grid import chunk_rows, image_grid, save_png
from igpt.data_pipeline.io import write_text_atomic
from igpt.evals.baselines import (PIXEL_LAYER, RANDOM_INIT, RAW_PIXELS, pixel_features, random_init_cache,
                                  random_init_model)
from igpt.evals.config import (EvalRun, EvalSearchConfig, FinetuneOptions, NllOptions, ProbeOptions, SampleOptions,
                               SplitOptions)
from igpt.evals.features import FeatureCache
from igpt.evals.inputs import (EvalData, EvalInputError, Layer, check_compatible, concat_label, layer_order, load_checked,
                          parse_layers, pick_device)
from igpt.evals.nll import evaluate_nll
from igpt.evals.plots import confusion_matrix, plot_confusion, plot_layer_accuracy
from igpt.evals.probe import widen_l2
from igpt.evals.sample import complete_bottom_half, completion_rows, sample_unconditional, to_rgb
from igpt.evals.summaries import (Baseline, FinetuneSummary, FinetuneTrial, MlflowRef, NllSummary, ProbeBest,
                                  ProbeLayer, ProbeSummary, SampleSummary, Summary, SummaryT)
from igpt.evals.tracking import ParentRun, parent_run
from igpt.evals.tune import tune_finetune, tune_probe


def _open(run: EvalRun) -> tuple[EvalData, Any, str]:
    """The shards, the checked model on its device and the palette's sha256; creates the output dir."""
    data = EvalData.open(run.data)
    model, _, palette_sha = load_checked(run.checkpoint, data, run.trust_checkpoint)
    model.to(pick_device(run.device))
    Path(run.out).mkdir(parents=True, exist_ok=True)
    return data, model, palette_sha


def _finish(parent: ParentRun, run: EvalRun, summary: SummaryT) -> SummaryT:
    """Record the parent run in ``summary``, write it as OUT/summary.json and log that file."""
    summary.mlflow = MlflowRef(tracking_uri=run.uri, experiment=run.experiment, parent_run_id=parent.run_id)
    path = Path(run.out) / "summary.json"
    write_text_atomic(json.dumps(summary.to_dict(), indent=2), path)
    parent.log_file(path)
    return summary


# ----------------------------------------------------------------------------- nll
def run_nll(run: EvalRun, opt: NllOptions = NllOptions()) -> NllSummary:
    """Loss on ``opt.split`` in nats/token and bits/pixel with a 95% interval over images."""
    data, model, sha = _open(run)
    data.num_samples(opt.split)
    with parent_run(run.uri, run.experiment, run.run_name or "nll") as parent:
        parent.log_params({**run.params(), "eval": "nll", "split": opt.split, "palette_sha256": sha})
        result = evaluate_nll(model, data, opt.split, batch_size=run.batch_size, device=pick_device(run.device),
                              limit=run.limit)
        parent.log_metrics(result)
        return _finish(parent, run, NllSummary(split=opt.split, **result))


# ----------------------------------------------------------------------------- sample
def run_sample(run: EvalRun, opt: SampleOptions = SampleOptions()) -> SampleSummary:
    """Unconditional samples (samples.png) and bottom-half completions of real images (completions.png)."""
    data, model, sha = _open(run)
    if not model.cfg.likelihood:
        raise EvalInputError(f"sample needs a model that predicts tokens; {run.checkpoint} has model.target="
                             f"{model.cfg.target!r} (normalised-pixel regression has no distribution to sample)")
    if opt.num_images > 0:
        data.num_samples(opt.split)  # a bad split is refused before the MLflow run starts
    palette = data.palette
    device = pick_device(run.device)
    gen = torch.Generator(device=device).manual_seed(opt.seed)
    R = data.resolution
    model.eval()
    files = {}
    with parent_run(run.uri, run.experiment, run.run_name or "sample") as parent:
        parent.log_params({**run.params(), **asdict(opt), "eval": "sample", "palette_sha256": sha})
        if opt.num_samples > 0:
            toks = sample_unconditional(model, opt.num_samples, R, temperature=opt.temperature, top_k=opt.top_k,
                                        generator=gen)
            grid = image_grid(chunk_rows(to_rgb(toks, palette, R), opt.cols), scale=opt.scale)
            files["samples"] = save_png(grid, Path(run.out) / "samples.png")
        if opt.num_images > 0:
            originals, _ = data.tokens(opt.split, limit=opt.num_images)
            done = complete_bottom_half(model, originals.to(device), R, opt.per_image, temperature=opt.temperature,
                                        top_k=opt.top_k, generator=gen)
            rows = completion_rows(to_rgb(originals, palette, R), to_rgb(done, palette, R))
            files["completions"] = save_png(image_grid(rows, scale=opt.scale), Path(run.out) / "completions.png")
        for f in files.values():
            parent.log_file(f)
        return _finish(parent, run, SampleSummary(resolution=R, files=files))


# ----------------------------------------------------------------------------- probe / finetune
def _eval_data(run: EvalRun, splits: SplitOptions, data: EvalData, model: Any, sha: str) -> EvalData | None:
    """The shards holding the test split (checked like --data), or None without a test split."""
    if splits.test_split is None:
        if splits.test_data:
            raise EvalInputError("--test-data given without --test-split")
        return None
    test_data = EvalData.open(splits.test_data) if splits.test_data else data
    if splits.test_data:
        check_compatible(model, sha, test_data, run.checkpoint)
        if test_data.class_names != data.class_names:
            raise EvalInputError(f"class names of {test_data.path} differ from those of {data.path}")
    test_data.num_samples(splits.test_split, labels=True)
    return test_data


def _storage(run: EvalRun, search: EvalSearchConfig) -> str | Path:
    return search.resources.storage_path or Path(run.out) / "ray_results"


def _accuracy_note(splits: SplitOptions) -> tuple[str, str]:
    if splits.test_split is None:
        return "val", (f"no test split given: accuracy is on the validation split {splits.val_split!r}, "
                       "the split used to choose hyperparameters (optimistic)")
    return "test", f"accuracy on the test split {splits.test_split!r}; hyperparameters chosen on {splits.val_split!r}"


FeatureFn = Callable[[EvalData, str], tuple[dict[int, np.ndarray], np.ndarray]]


def _gather(features: FeatureFn, sources: dict[str, tuple[EvalData, str]]
            ) -> tuple[dict[int, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """({layer: {train|val|test: (N, D)}}, {train|val|test: labels}) from one feature source."""
    feats: dict[int, dict[str, np.ndarray]] = {}
    labels: dict[str, np.ndarray] = {}
    for key, (d, split) in sources.items():
        by_layer, labels[key] = features(d, split)
        for l, x in by_layer.items():
            feats.setdefault(l, {})[key] = x
    return feats, labels


def _with_concat(feats: dict[Layer, dict[str, np.ndarray]], layers: list[int]) -> list[Layer]:
    """Add the concatenation of ``layers``' features as one more feature set; the feature sets to probe."""
    label = concat_label(layers)
    feats[label] = {split: np.concatenate([feats[l][split] for l in layers], axis=1) for split in feats[layers[0]]}
    return [*layers, label]


def _select(rows: list[dict[str, Any]], acc_key: str) -> tuple[dict[str, Any], dict[Layer, ProbeLayer]]:
    """The best trial by validation accuracy (ties → the lower layer, single layers before concatenations) and
    per layer its best L2, the L2 values searched and whether the best still lies at an edge of them."""
    rows = sorted(rows, key=lambda r: layer_order(r["config"]["layer"]))
    per_layer: dict[Layer, ProbeLayer] = {}
    for l in dict.fromkeys(r["config"]["layer"] for r in rows):
        mine = [r for r in rows if r["config"]["layer"] == l]
        best_l = max(mine, key=lambda r: r["metrics"]["val_acc"])
        grid = {r["config"]["l2"]: r["metrics"]["val_acc"] for r in mine}
        per_layer[l] = ProbeLayer(l2=best_l["config"]["l2"], val_acc=best_l["metrics"]["val_acc"],
                                  eval_acc=best_l["metrics"][acc_key], l2_searched=sorted(grid),
                                  l2_at_edge=widen_l2(grid) is not None)
    best = max(rows, key=lambda r: r["metrics"]["val_acc"])  # the first of equals, in layer order
    return best, per_layer


def _log_per_layer(parent: ParentRun, per_layer: dict[Layer, ProbeLayer], eval_key: str) -> None:
    """Per block index: metrics stepped by the layer; a concatenation: ``probe_concat_*`` metrics."""
    for l, v in per_layer.items():
        values = {"val_acc": v.val_acc, f"{eval_key}_acc": v.eval_acc, "best_l2": v.l2,
                  "l2_at_edge": float(v.l2_at_edge)}
        if isinstance(l, str):
            parent.log_metrics({f"probe_concat_{k}": x for k, x in values.items()})
        else:
            for k, x in values.items():
                parent.client.log_metric(parent.run_id, f"probe_{k}", x, step=l)


def _probe_baselines(run: EvalRun, sources: dict[str, tuple[EvalData, str]], layers: list[int], model_cfg: Any,
                     num_classes: int, search: EvalSearchConfig, parent: ParentRun, acc_key: str,
                     cache_root: Path, concat: bool, palette: np.ndarray) -> dict[str, Baseline]:
    """The same probe grid on raw pixels and on a seeded random model of the same shape (its layers
    concatenated too with ``concat``)."""
    device = pick_device(run.device)
    seed = search.probe.baseline_seed
    random_cache = random_init_cache(cache_root, model_cfg, seed, palette)

    def pixels(d: EvalData, split: str) -> tuple[dict[int, np.ndarray], np.ndarray]:
        x, y = pixel_features(d, split, batch_size=run.batch_size, limit=run.limit)
        return {PIXEL_LAYER: x}, y

    def random_init(d: EvalData, split: str) -> tuple[dict[int, np.ndarray], np.ndarray]:
        got = random_cache.get(d, split, layers, batch_size=run.batch_size, device=device, limit=run.limit)
        random_cache.model.cpu()
        return got

    out = {}
    for name, fn in ((RAW_PIXELS, pixels), (RANDOM_INIT, random_init)):
        feats, labels = _gather(fn, sources)
        keys = _with_concat(feats, layers) if concat and name == RANDOM_INIT else sorted(feats)
        rows = tune_probe(feats, labels, num_classes, keys, search.probe, search.resources, parent=parent,
                          tracking_uri=run.uri, storage_path=_storage(run, search), features_name=name,
                          verbose=run.verbose)
        best, _ = _select(rows, acc_key)
        layer = best["config"]["layer"]
        out[name] = Baseline(layer=None if layer == PIXEL_LAYER else layer, l2=best["config"]["l2"],
                             val_acc=best["metrics"]["val_acc"], accuracy=best["metrics"][acc_key], trials=len(rows),
                             l2_searched=sorted({r["config"]["l2"] for r in rows}),
                             seed=seed if name == RANDOM_INIT else None)
    return out


def run_probe(run: EvalRun, splits: SplitOptions, opt: ProbeOptions, search: EvalSearchConfig) -> ProbeSummary:
    """Linear probes over layers × L2 on a Ray Tune grid, each layer's L2 grid widened while its best lies at
    an edge; best by validation accuracy. ``opt.concat`` adds the concatenation of the layers' pooled states
    as one more feature set (labelled ``"6+7+8"``).

    With ``opt.baselines`` the same grid also probes raw pixels and a randomly initialised model of the
    same shape; the summary's ``beats_baselines`` says whether the model's accuracy beats both.
    """
    data, model, sha = _open(run)
    layers = parse_layers(opt.layers, model.cfg.n_layer)
    if opt.concat and len(layers) < 2:
        raise EvalInputError(f"--concat needs two or more --layers, got {layers}")
    for s in (splits.train_split, splits.val_split):
        data.num_samples(s, labels=True)
    test_data = _eval_data(run, splits, data, model, sha)
    cache_root = Path(opt.cache_dir or Path(run.out) / "feature_cache")
    cache = FeatureCache(cache_root, model)
    device = pick_device(run.device)
    sources = {"train": (data, splits.train_split), "val": (data, splits.val_split)}
    if test_data is not None:
        sources["test"] = (test_data, splits.test_split)
    feats, labels = _gather(
        lambda d, s: cache.get(d, s, layers, batch_size=run.batch_size, device=device, limit=run.limit), sources)
    model.cpu()
    keys = _with_concat(feats, layers) if opt.concat else layers
    num_classes = data.num_classes(torch.as_tensor(np.concatenate(list(labels.values()))))
    eval_key, note = _accuracy_note(splits)
    acc_key = f"{eval_key}_acc"
    with parent_run(run.uri, run.experiment, run.run_name or "probe") as parent:
        parent.log_params({**run.params(), "eval": "probe", "layers": layers, "concat": opt.concat,
                           "l2": search.probe.l2, "l2_widen": search.probe.widen, "max_iter": search.probe.max_iter,
                           "train_split": splits.train_split, "val_split": splits.val_split,
                           "test_split": splits.test_split, "palette_sha256": sha,
                           "checkpoint_id": cache.checkpoint_id, "baselines": opt.baselines})
        rows = tune_probe(feats, labels, num_classes, keys, search.probe, search.resources, parent=parent,
                          tracking_uri=run.uri, storage_path=_storage(run, search), verbose=run.verbose)
        best, per_layer = _select(rows, acc_key)
        _log_per_layer(parent, per_layer, eval_key)
        parent.log_params({"l2_searched": sorted({r["config"]["l2"] for r in rows})})
        base = (_probe_baselines(run, sources, layers, model.cfg, num_classes, search, parent, acc_key, cache_root,
                                 opt.concat, data.palette) if opt.baselines else {})
        eval_split = splits.test_split if eval_key == "test" else splits.val_split
        cm = confusion_matrix(labels[eval_key], best["pred"], num_classes)
        out = Path(run.out)
        parent.log_file(plot_layer_accuracy(per_layer, out / "probe_accuracy_per_layer.png", eval_split,
                                            {n: b.val_acc for n, b in base.items()}))
        parent.log_file(plot_confusion(cm, data.class_names, out / "confusion_matrix.png",
                                       f"probe layer {best['config']['layer']} on {eval_split}"))
        summary = ProbeSummary(
            accuracy=best["metrics"][acc_key], accuracy_split=eval_split, note=note,
            best=ProbeBest(layer=best["config"]["layer"], l2=best["config"]["l2"], val_acc=best["metrics"]["val_acc"]),
            per_layer={str(l): v for l, v in per_layer.items()}, trials=len(rows),
            num_train=int(len(labels["train"])), num_val=int(len(labels["val"])),
            confusion_matrix=cm.tolist(), class_names=data.class_names,
        )
        parent.log_metrics({"accuracy": summary.accuracy, "best_layer": summary.best.layer,  # not a concat's
                            "best_is_concat": float(isinstance(summary.best.layer, str)),
                            "best_l2": summary.best.l2, "best_val_acc": summary.best.val_acc})
        if opt.baselines:
            summary.baselines = base
            summary.beats_baselines = all(summary.accuracy > b.accuracy for b in base.values())
            parent.log_metrics({**{f"baseline_{n}_acc": b.accuracy for n, b in base.items()},
                                "beats_baselines": float(summary.beats_baselines)})
        return _finish(parent, run, summary)


def run_finetune(run: EvalRun, splits: SplitOptions, search: EvalSearchConfig,
                 opt: FinetuneOptions = FinetuneOptions()) -> FinetuneSummary:
    """Fine-tuning trials (lr × λ × epochs) under ASHA; best by validation accuracy. ``opt.init="random"``: the
    supervised baseline, the checkpoint's architecture from a seeded random initialisation (``finetune.seed``),
    trained with labels only (λ = 0)."""
    if splits.test_split is not None or splits.test_data is not None:
        raise EvalInputError("finetune selects and reports on the validation split; --test-split is not supported")
    data, model, sha = _open(run)
    if opt.init == "random":
        model = random_init_model(model.cfg, search.finetune.seed, data.palette)
        search = replace(search, finetune=replace(search.finetune, lam=[0.0]))
    train = data.tokens(splits.train_split, labels=True, limit=run.limit)
    val = data.tokens(splits.val_split, labels=True, limit=run.limit)
    num_classes = data.num_classes(torch.cat([train[1], val[1]]))
    model.cpu()
    with parent_run(run.uri, run.experiment, run.run_name or "finetune") as parent:
        parent.log_params({**run.params(), **{f"search.{k}": v for k, v in asdict(search.finetune).items()},
                           "eval": "finetune", "train_split": splits.train_split, "val_split": splits.val_split,
                           "palette_sha256": sha, "init": opt.init})
        rows = tune_finetune(model, train, val, num_classes, search.finetune, search.resources, parent=parent,
                             tracking_uri=run.uri, storage_path=_storage(run, search), verbose=run.verbose)
        best = max(rows, key=lambda r: r["metrics"]["best_val_acc"])
        cm = confusion_matrix(val[1].numpy(), best["pred"], num_classes)
        parent.log_file(plot_confusion(cm, data.class_names, Path(run.out) / "confusion_matrix.png",
                                       f"fine-tuned, on {splits.val_split}"))
        _, note = _accuracy_note(splits)
        summary = FinetuneSummary(
            accuracy=best["metrics"]["best_val_acc"], accuracy_split=splits.val_split, note=note,
            best={**best["config"], "epochs_run": len(best["val_acc_per_epoch"])},
            best_trial_val_acc_per_epoch=best["val_acc_per_epoch"],
            trials=[FinetuneTrial(config=r["config"], best_val_acc=r["metrics"]["best_val_acc"],
                                  epochs_run=len(r["val_acc_per_epoch"])) for r in rows],
            num_train=int(len(train[1])), num_val=int(len(val[1])),
            confusion_matrix=cm.tolist(), class_names=data.class_names, init=opt.init,
        )
        parent.log_metrics({"accuracy": summary.accuracy, "best_lr": best["config"]["lr"],
                            "best_lam": best["config"]["lam"]})
        return _finish(parent, run, summary)


def format_summary(summary: Summary) -> str:
    """The summary as indented JSON, without the bulky confusion matrix."""
    return json.dumps(summary.brief(), indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
