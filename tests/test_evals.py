"""Evals: likelihood, sampling, feature cache, linear probe, fine-tuning, Ray Tune + MLflow, bad input.

A tiny iGPT is trained a few hundred steps in plain torch on the shared CIFAR-10 token shards and
written as a release dir (the format ``igpt.pretrain.release.load_model`` reads).
"""
from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from igpt.data_pipeline.grid import chunk_rows, image_grid
from igpt.data_pipeline.io import file_sha256
from igpt.data_pipeline.manifest import Manifest, SplitInfo
from igpt.data_pipeline.palette import save_palette, uniform9_palette
from igpt.evals.baselines import pixel_features, random_init_cache, random_init_model
from igpt.evals.commands import _accuracy_note, run_finetune, run_nll, run_probe, run_sample
from igpt.evals.config import (EvalRun, NllOptions, ProbeOptions, SampleOptions, SplitOptions, field_default,
                               load_search_config)
from igpt.evals.features import FeatureCache
from igpt.evals.finetune import finetune
from igpt.evals.inputs import EvalData, EvalInputError, parse_layers
from igpt.evals.nll import evaluate_nll
from igpt.evals.probe import fit_probe, widen_l2
from igpt.evals.sample import complete_bottom_half
from igpt.evals.summaries import FinetuneSummary, NllSummary, ProbeSummary, SampleSummary
from igpt.evals.tune import TRIAL_KIND, trial_name
from igpt.pretrain.model import IGPT
from igpt.pretrain.presets import model_config

RES = 16
TINY = {"n_ctx": RES * RES, "n_embd": 32, "n_head": 2}  # igpt-tiny at half width: CPU-cheap


def write_release(model: IGPT, out: Path, data_dir: Path, palette: Path | None = None) -> Path:
    """A release dir (model.safetensors with the palette sha256, config.yaml, palette.npy)."""
    from safetensors.torch import save_file

    from igpt.pretrain.config import load_config, save_config

    palette = palette or data_dir / "palette.npy"
    out.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"palette_sha256": file_sha256(palette)})
    fields = ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size")
    cfg = load_config(None, [f"data.dir={data_dir}", "model.preset=igpt-tiny",
                             *(f"model.{f}={getattr(model.cfg, f)}" for f in fields)])
    save_config(cfg, out / "config.yaml")
    shutil.copyfile(palette, out / "palette.npy")
    return out


def train_tiny(data_dir: Path, steps: int, seed: int = 0) -> IGPT:
    """The TINY model trained ``steps`` AdamW steps on the train split (batch 16)."""
    torch.manual_seed(seed)
    model = IGPT(model_config("igpt-tiny", **TINY))
    tokens, _ = EvalData.open(data_dir).tokens("train")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model.loss(tokens[torch.randint(len(tokens), (16,), generator=gen)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def releases(tmp_path_factory, cifar_tokens) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("releases")
    torch.manual_seed(1)
    return {
        "trained": write_release(train_tiny(cifar_tokens, steps=30), root / "trained", cifar_tokens),
        "untrained": write_release(IGPT(model_config("igpt-tiny", **TINY)), root / "untrained", cifar_tokens),
    }


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow sqlite store for the module (creating a store runs its migrations: slow)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def eval_main(argv: list[str]) -> int:
    """`igpt eval …` through the console script's entry point, errors handled as on the command line."""
    from igpt.cli import main

    return main(argv)


def edited_copy(src: Path, dst: Path, edit: Callable[[Manifest], Manifest]) -> Path:
    """A copy of a token-shard dir with its manifest replaced by ``edit(manifest)``."""
    shutil.copytree(src, dst)
    edit(Manifest.load(dst)).save(dst)
    return dst


# ----------------------------------------------------------------------------- nll
def test_nll_trained_below_untrained_and_exact_at_init(releases, cifar_tokens, tmp_path, tracking_uri):
    untrained = run_nll(EvalRun(str(releases["untrained"]), str(cifar_tokens), out=str(tmp_path / "u"),
                                tracking_uri=tracking_uri))
    trained = run_nll(EvalRun(str(releases["trained"]), str(cifar_tokens), out=str(tmp_path / "t"),
                              tracking_uri=tracking_uri))
    # the zero-initialised head gives a uniform distribution: exactly ln 512 nats per token
    assert untrained.nats_per_token == pytest.approx(math.log(512), abs=1e-5)
    assert trained.nats_per_token < untrained.nats_per_token - 1.0  # ~3.8 after 30 steps
    assert trained.nats_ci_low < trained.nats_per_token < trained.nats_ci_high
    assert trained.bits_per_pixel == pytest.approx(trained.nats_per_token / math.log(2))
    assert trained.images == EvalData.open(cifar_tokens).num_samples("val")
    written = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert written == trained.to_dict() and list(written)[:2] == ["eval", "split"] and list(written)[-1] == "mlflow"
    assert NllSummary.from_dict(written) == trained


def test_nll_matches_float64_reference(releases, cifar_tokens):
    from igpt.pretrain.release import load_model

    model = load_model(releases["trained"])[0]
    data = EvalData.open(cifar_tokens)
    result = evaluate_nll(model, data, "val", batch_size=50, limit=100)
    tokens, _ = data.tokens("val", limit=100)
    with torch.no_grad():
        ref = model.double()(tokens).logits.log_softmax(-1).gather(-1, tokens[..., None]).neg().mean().item()
    assert result["images"] == 100
    assert result["nats_per_token"] == pytest.approx(ref, abs=1e-5)


# ----------------------------------------------------------------------------- sample
def test_sample_writes_grids_of_the_right_size(releases, cifar_tokens, tmp_path, tracking_uri):
    opt = SampleOptions(num_samples=4, num_images=2, per_image=2, cols=2, scale=2, top_k=50, temperature=0.9)
    summary = run_sample(EvalRun(str(releases["trained"]), str(cifar_tokens), out=str(tmp_path),
                                 tracking_uri=tracking_uri), opt)
    cell, pad = RES * 2, 2
    with Image.open(summary.files["samples"]) as im:  # 2 rows x 2 cols
        assert im.size == (2 * cell + 3 * pad, 2 * cell + 3 * pad) and im.mode == "RGB"
    with Image.open(summary.files["completions"]) as im:  # 2 rows x (occluded + 2 completions + original)
        assert im.size == (4 * cell + 5 * pad, 2 * cell + 3 * pad)


def test_completion_keeps_the_top_half(releases, cifar_tokens):
    from igpt.pretrain.release import load_model

    model = load_model(releases["trained"])[0]
    tokens, _ = EvalData.open(cifar_tokens).tokens("val", limit=3)
    out = complete_bottom_half(model, tokens, RES, per_image=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 2, RES * RES)
    half = RES * RES // 2
    assert torch.equal(out[:, :, :half], tokens[:, None, :half].expand(3, 2, half))
    assert not torch.equal(out[:, 0, half:], out[:, 1, half:])  # two different samples


def test_image_grid_layout():
    imgs = [np.full((4, 4, 3), i, np.uint8) for i in range(3)]
    grid = image_grid([imgs, imgs[:1]], scale=3, pad=1)
    assert grid.shape == (2 * 12 + 3, 3 * 12 + 4, 3)
    assert (grid[1:13, 1 + 13 : 13 + 13] == 1).all() and (grid[14:26, 14:26] == 255).all()


def test_image_grid_tiles_a_flat_list_in_rows_and_upscales():
    images = np.stack([np.full((2, 3, 3), i, np.uint8) for i in range(5)])
    grid = image_grid(chunk_rows(images, 3), scale=2, pad=1)
    assert grid.shape == (2 * (4 + 1) + 1, 3 * (6 + 1) + 1, 3)
    assert (grid[1:5, 1:7] == 0).all() and (grid[6:10, 8:14] == 4).all() and (grid[6:10, 15:21] == 255).all()


# ----------------------------------------------------------------------------- features
def test_feature_cache_extracts_once_and_matches_model(releases, cifar_tokens, tmp_path):
    from igpt.pretrain.release import load_model

    model = load_model(releases["trained"])[0]
    data = EvalData.open(cifar_tokens)
    cache = FeatureCache(tmp_path, model)
    feats, labels = cache.get(data, "val", [0, 2], batch_size=64, limit=80)
    path = cache.paths(data, "val", 2, limit=80)[0]
    stamp = path.stat().st_mtime_ns
    again, labels2 = cache.get(data, "val", [2, 0], limit=80)
    assert path.stat().st_mtime_ns == stamp  # read back, not recomputed
    assert feats[0].shape == (80, model.cfg.n_embd) and np.array_equal(labels, labels2)
    tokens, ref_labels = data.tokens("val", labels=True, limit=80)
    with torch.no_grad():
        hidden = model(tokens, return_hidden=True).hidden_states
    np.testing.assert_allclose(again[2], hidden[2].mean(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(again[0], hidden[0].mean(1).numpy(), atol=1e-5)
    np.testing.assert_array_equal(labels, ref_labels.numpy())
    other = FeatureCache(tmp_path, load_model(releases["untrained"])[0])
    assert other.paths(data, "val", 2, limit=80)[0] != path


def test_baseline_features_pixels_and_seeded_random_model(releases, cifar_tokens, tmp_path):
    from igpt.data_pipeline.palette import load_palette
    from igpt.pretrain.release import load_model

    data = EvalData.open(cifar_tokens)
    x, y = pixel_features(data, "val", batch_size=16, limit=40)
    tokens, labels = data.tokens("val", labels=True, limit=40)
    palette, _ = load_palette(cifar_tokens / "palette.npy")
    assert x.shape == (40, RES * RES * 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[3].reshape(RES * RES, 3), palette[tokens[3].numpy()] / np.float32(255))
    np.testing.assert_array_equal(y, labels.numpy())

    trained = load_model(releases["trained"])[0]
    state = torch.random.get_rng_state()
    a, b = random_init_model(trained.cfg, 7), random_init_model(trained.cfg, 7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.wte.weight, random_init_model(trained.cfg, 8).wte.weight)
    cache = random_init_cache(tmp_path, trained.cfg, 7)
    assert cache.checkpoint_id.startswith("random-init-")
    assert cache.paths(data, "val", 1)[0] != FeatureCache(tmp_path, trained).paths(data, "val", 1)[0]


# ----------------------------------------------------------------------------- probe
def test_probe_objective_matches_sklearn_float64():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    n, d, c, l2 = 400, 12, 4, 0.05
    y = rng.integers(0, c, n)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.normal(size=(c, d))[y] + 5.0
    probe = fit_probe(x, y, l2, c, max_iter=1000, tol=1e-10, dtype=torch.float64)
    z = (x - x.mean(0)) / x.std(0)
    sk = LogisticRegression(C=1 / (l2 * n), tol=1e-12, max_iter=5000).fit(z, y)
    np.testing.assert_allclose(probe.weight.numpy(), sk.coef_, atol=1e-4)
    # sklearn's multinomial intercepts are defined up to a shared constant
    np.testing.assert_allclose(probe.bias.numpy() - probe.bias.numpy().mean(), sk.intercept_ - sk.intercept_.mean(),
                               atol=1e-4)


def test_widen_l2_steps_past_an_edge_until_the_best_is_interior():
    assert widen_l2({1e-4: 0.5, 1e-3: 0.4}) == 1e-5  # best at the low edge: one decade lower
    assert widen_l2({0.01: 0.3, 0.1: 0.4}) == 1.0  # best at the high edge
    assert widen_l2({1e-3: 0.4, 1e-2: 0.4}) == 0.1  # a flat high end may precede the optimum
    assert widen_l2({3e-4: 0.5, 1e-3: 0.4}) == pytest.approx(9e-5)  # the grid's own ratio
    assert widen_l2({1e-4: 0.4, 1e-3: 0.5, 1e-2: 0.45}) is None  # interior
    assert widen_l2({1e-5: 0.5, 1e-4: 0.5, 1e-3: 0.4}) is None  # the unregularised limit: smaller changes nothing
    assert widen_l2({0.0: 0.5, 1e-3: 0.4}) is None and widen_l2({0.01: 0.5}) is None


def test_score_probe_widens_to_an_interior_optimum():
    """200 features, 4 informative: fitted without much L2 the probe overfits; the grid starts far too low."""
    from igpt.evals.score import probe_layer

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    x = rng.normal(size=(400, 200)).astype(np.float32)
    x[:, :4] += 0.8 * np.eye(4)[y]
    got = probe_layer(x[:300], y[:300], x[300:], y[300:], [1e-4, 1e-3], "cpu", widen=8)
    grid = sorted(got["holdout_accuracy"])
    assert len(grid) > 3 and not got["l2_at_edge"]
    assert grid[0] < got["l2"] < grid[-1] and got["holdout_accuracy"][got["l2"]] > got["holdout_accuracy"][1e-3]
    stopped = probe_layer(x[:300], y[:300], x[300:], y[300:], [1e-4, 1e-3], "cpu", widen=1)
    assert len(stopped["holdout_accuracy"]) == 3 and stopped["l2_at_edge"]  # out of rounds, and says so


def _cifar_pixels(cifar_dir: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    import webdataset as wds

    xs, ys = [], []
    ds = wds.WebDataset([str(cifar_dir / "cifar10-train-000000.tar")], shardshuffle=False).to_tuple("jpg", "cls")
    for jpg, cls in ds:
        xs.append(np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.float32).reshape(-1) / 255)
        ys.append(int(cls))
        if len(xs) == n:
            break
    return np.stack(xs), np.asarray(ys)


def test_probe_on_raw_pixels_recovers_cifar_accuracy(cifar_dir):
    """Raw 32x32 pixels are a known feature: logistic regression gives ~35-40% on CIFAR-10."""
    x, y = _cifar_pixels(cifar_dir, 4000)
    probe = fit_probe(x[:3000], y[:3000], 1.0, 10, max_iter=150)
    acc = probe.evaluate(torch.from_numpy(x[3000:]), torch.from_numpy(y[3000:]))["accuracy"]
    assert 0.33 <= acc <= 0.45, acc


# ----------------------------------------------------------------------------- finetune
def test_finetune_improves_over_first_epoch(releases, cifar_tokens):
    from igpt.pretrain.release import load_model

    data = EvalData.open(cifar_tokens)
    train, val = data.tokens("train", labels=True, limit=400), data.tokens("val", labels=True)
    history = finetune(load_model(releases["trained"])[0], train, val, 10, lr=3e-3, lam=0.5, max_epochs=3,
                       patience=3, batch_size=16)
    first = history.epochs[0]["val_acc"]
    assert history.best_val_acc > first, [e["val_acc"] for e in history.epochs]
    assert history.best_val_pred.shape == (len(val[1]),)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_are_named(releases, cifar_tokens, tmp_path):
    other = tmp_path / "other_palette.npy"
    pal = uniform9_palette().copy()
    pal[0] = [1, 2, 3]
    save_palette(pal, other)
    from igpt.pretrain.release import load_model

    foreign = write_release(load_model(releases["trained"])[0], tmp_path / "foreign", cifar_tokens, palette=other)
    with pytest.raises(EvalInputError, match="palette mismatch.*sha256"):
        run_nll(EvalRun(str(foreign), str(cifar_tokens), out=str(tmp_path / "o")))

    def unlabel(m):
        return replace(m, labelled=False, num_classes=None, class_names=None)

    unlabelled = edited_copy(cifar_tokens, tmp_path / "unlabelled", unlabel)
    search = load_search_config()
    with pytest.raises(EvalInputError, match="'train'.*no labels"):
        run_probe(EvalRun(str(releases["trained"]), str(unlabelled), out=str(tmp_path / "o")), SplitOptions(),
                  ProbeOptions(layers="1"), search)
    with pytest.raises(EvalInputError, match="no labels"):
        run_finetune(EvalRun(str(releases["trained"]), str(unlabelled), out=str(tmp_path / "o")), SplitOptions(),
                     search)
    with pytest.raises(EvalInputError, match=r"layer index \[7\] out of range.*0\.\.2"):
        run_probe(EvalRun(str(releases["trained"]), str(cifar_tokens), out=str(tmp_path / "o")), SplitOptions(),
                  ProbeOptions(layers="1,7"), search)
    with pytest.raises(EvalInputError, match="bad --layers"):
        parse_layers("one", 2)

    def add_empty(m):
        empty = SplitInfo(num_samples=0, stored_resolution=m.resolution, shards=[])
        return replace(m, splits={**m.splits, "empty": empty})

    with_empty = edited_copy(cifar_tokens, tmp_path / "with_empty", add_empty)
    with pytest.raises(EvalInputError, match="split 'empty' .* is empty"):
        run_nll(EvalRun(str(releases["trained"]), str(with_empty), out=str(tmp_path / "o")), NllOptions(split="empty"))
    with pytest.raises(EvalInputError, match="split 'test' not in"):
        run_nll(EvalRun(str(releases["trained"]), str(cifar_tokens), out=str(tmp_path / "o")), NllOptions(split="test"))


def test_cli_reports_input_errors(releases, cifar_tokens, tmp_path, capsys):
    rc = eval_main(["eval", "probe", "--checkpoint", str(releases["trained"]), "--data", str(cifar_tokens),
               "--out", str(tmp_path), "--layers", "9"])
    assert rc == 2
    assert "layer index [9] out of range" in capsys.readouterr().err
    rc = eval_main(["eval", "probe", "--checkpoint", str(releases["trained"]), "--data", str(cifar_tokens),
                    "--out", str(tmp_path), "--set", "probe.l3=[1.0]"])
    assert rc == 2
    assert "search config key 'probe.l3'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Ray Tune + MLflow
def _mlflow_runs(uri: str, parent_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    return parent, children, artifacts


def test_accuracy_split_is_said_plainly():
    split, note = _accuracy_note(SplitOptions(val_split="holdout"))
    assert split == "val" and "no test split given" in note and "'holdout'" in note
    split, note = _accuracy_note(SplitOptions(test_split="test"))
    assert split == "test" and "test split 'test'" in note


@pytest.mark.slow
def test_probe_cli_runs_tune_trials_logged_to_mlflow(ray_session, releases, cifar_tokens, tmp_path, capsys,
                                                     tracking_uri):
    def val_as_test(m):  # a separate shard dir whose 'test' split is the val shards
        return replace(m, splits={"test": m.split("val")})

    test_dir = edited_copy(cifar_tokens, tmp_path / "test_data", val_as_test)
    rc = eval_main(["eval", "probe", "--checkpoint", str(releases["trained"]), "--data", str(cifar_tokens),
                    "--out", str(tmp_path / "out"), "--tracking-uri", tracking_uri, "--layers", "1,2",
                    "--test-split", "test", "--test-data", str(test_dir),
                    "--set", "probe.l2=[0.01]", "--set", "probe.max_iter=100"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)  # stdout holds the summary alone
    assert summary["trials"] == 2 and summary["accuracy_split"] == "test"
    assert set(summary["per_layer"]) == {"1", "2"}
    # the test split holds the val images: test accuracy of the chosen probe equals its val accuracy
    assert summary["accuracy"] == pytest.approx(summary["best"]["val_acc"])
    assert summary["accuracy"] > 0.15  # 10 classes: well above chance for a trained model
    parent, children, artifacts = _mlflow_runs(summary["mlflow"]["tracking_uri"], summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["accuracy"] == pytest.approx(summary["accuracy"])
    assert {"summary.json", "probe_accuracy_per_layer.png", "confusion_matrix.png"} <= artifacts
    assert len(children) == 2
    assert {c.data.params["layer"] for c in children} == {"1", "2"}
    assert all(c.info.status == "FINISHED" and {"val_acc", "test_acc"} <= set(c.data.metrics) for c in children)
    assert max(c.data.metrics["val_acc"] for c in children) == pytest.approx(summary["best"]["val_acc"])


@pytest.mark.slow
def test_finetune_tune_trials_with_asha(ray_session, releases, cifar_tokens, tmp_path, tracking_uri):
    search = load_search_config(None, ["finetune.lr=[0.003]", "finetune.lam=[0.0,0.5]", "finetune.epochs=[2]",
                                       "finetune.batch_size=16"])
    run = EvalRun(str(releases["trained"]), str(cifar_tokens), out=str(tmp_path), limit=300, tracking_uri=tracking_uri)
    summary = run_finetune(run, SplitOptions(), search)
    assert len(summary.trials) == 2
    assert summary.accuracy == max(t.best_val_acc for t in summary.trials)
    assert summary.accuracy == max(summary.best_trial_val_acc_per_epoch)
    assert summary.accuracy > 0.15
    assert FinetuneSummary.from_dict(json.loads((tmp_path / "summary.json").read_text())) == summary
    parent, children, artifacts = _mlflow_runs(summary.mlflow.tracking_uri, summary.mlflow.parent_run_id)
    assert parent.info.status == "FINISHED" and {"summary.json", "confusion_matrix.png"} <= artifacts
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.params["lam"] for c in children} == {"0.0", "0.5"}


@pytest.mark.slow
def test_probe_baselines_in_the_same_run(ray_session, releases, cifar_tokens, tmp_path, capsys, tracking_uri):
    out = tmp_path / "out"
    rc = eval_main(["eval", "probe", "--checkpoint", str(releases["trained"]), "--data", str(cifar_tokens),
                    "--out", str(out), "--tracking-uri", tracking_uri, "--layers", "2", "--baselines",
                    "--set", "probe.l2=[0.01,1.0]", "--set", "probe.max_iter=100", "--set", "probe.widen=0"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    base = summary["baselines"]
    assert set(base) == {"raw_pixels", "random_init"}
    assert base["raw_pixels"]["layer"] is None and base["random_init"]["layer"] == 2
    assert base["random_init"]["seed"] == 0
    assert all(b["trials"] == 2 and b["l2"] in (0.01, 1.0) for b in base.values())
    assert base["raw_pixels"]["accuracy"] > 0.2  # 10 classes, chance 0.1: pixels carry signal
    # no test split: accuracy is on the validation split, so it is the selected trial's val accuracy
    assert all(b["accuracy"] == pytest.approx(b["val_acc"]) for b in base.values())
    assert summary["beats_baselines"] == all(summary["accuracy"] > b["accuracy"] for b in base.values())
    assert list((out / "feature_cache").glob("random-init-*/*/val-L2.npy"))  # cached apart from trained weights

    parent, children, _ = _mlflow_runs(summary["mlflow"]["tracking_uri"], summary["mlflow"]["parent_run_id"])
    for name in ("raw_pixels", "random_init"):
        assert parent.data.metrics[f"baseline_{name}_acc"] == pytest.approx(base[name]["accuracy"])
    assert parent.data.metrics["beats_baselines"] == float(summary["beats_baselines"])
    by_features: dict[str, list] = {}
    for c in children:
        by_features.setdefault(c.data.tags["probe_features"], []).append(c)
    assert {k: len(v) for k, v in by_features.items()} == {"model": 2, "raw_pixels": 2, "random_init": 2}
    names = [c.info.run_name for c in children]
    assert len(set(names)) == len(names)  # each trial is told apart in the MLflow UI by its grid values
    for name, runs in by_features.items():
        for c in runs:
            assert c.info.run_name == trial_name(TRIAL_KIND.get(name, ""), {
                "layer": int(c.data.params["layer"]), "l2": float(c.data.params["l2"])}) and c.info.status == "FINISHED"
    assert {c.info.run_name for c in by_features["raw_pixels"]} == {"l2=0.01 (pixels)", "l2=1 (pixels)"}
    assert {c.data.params["layer"] for c in by_features["raw_pixels"]} == {"-1"}
    assert max(c.data.metrics["val_acc"] for c in by_features["raw_pixels"]) == pytest.approx(
        base["raw_pixels"]["val_acc"])


@pytest.mark.slow
def test_probe_widens_its_grid_and_concatenates_layers(ray_session, releases, cifar_tokens, tmp_path, capsys,
                                                        tracking_uri):
    rc = eval_main(["eval", "probe", "--checkpoint", str(releases["trained"]), "--data", str(cifar_tokens),
                    "--out", str(tmp_path / "out"), "--tracking-uri", tracking_uri, "--layers", "1,2", "--concat",
                    "--limit", "600", "--set", "probe.l2=[10.0,100.0]", "--set", "probe.max_iter=100",
                    "--set", "probe.widen=3"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    per = summary["per_layer"]
    assert list(per) == ["1", "2", "1+2"]
    for v in per.values():  # widened down from the grid's low edge, until interior or out of rounds
        assert v["l2_searched"][-2:] == [10.0, 100.0] and len(v["l2_searched"]) > 2
        assert len(v["l2_searched"]) == 5 or not v["l2_at_edge"]  # at an edge only when out of rounds
    assert summary["trials"] == sum(len(v["l2_searched"]) for v in per.values())
    best = summary["best"]
    assert per[str(best["layer"])]["val_acc"] == best["val_acc"] == max(v["val_acc"] for v in per.values())
    parent, children, _ = _mlflow_runs(summary["mlflow"]["tracking_uri"], summary["mlflow"]["parent_run_id"])
    assert len(children) == summary["trials"] and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.params["layer"] for c in children} == {"1", "2", "1+2"}
    assert "L1+2 l2=10" in {c.info.run_name for c in children}
    assert parent.data.params["concat"] == "True" and parent.data.params["l2_widen"] == "3"
    assert json.loads(parent.data.params["l2_searched"]) == sorted({x for v in per.values() for x in v["l2_searched"]})
    assert parent.data.metrics["probe_concat_val_acc"] == pytest.approx(per["1+2"]["val_acc"])
    assert parent.data.metrics["probe_concat_best_l2"] == per["1+2"]["l2"]
    from mlflow.tracking import MlflowClient

    stepped = MlflowClient(tracking_uri).get_metric_history(parent.info.run_id, "probe_best_l2")
    assert {m.step: m.value for m in stepped} == {1: per["1"]["l2"], 2: per["2"]["l2"]}


MLFLOW = {"tracking_uri": "sqlite:///o/mlflow.db", "experiment": "igpt-eval", "parent_run_id": "abc"}
SUMMARIES = [  # summary.json as the evals write it, keys in order
    (NllSummary, {"eval": "nll", "split": "val", "images": 200, "nats_per_token": 3.8, "nats_ci_low": 3.7,
                  "nats_ci_high": 3.9, "bits_per_pixel": 5.48, "bpp_ci_low": 5.3, "bpp_ci_high": 5.6,
                  "sem_nats": 0.05, "seconds": 1.5, "mlflow": MLFLOW}),
    (SampleSummary, {"eval": "sample", "resolution": 16,
                     "files": {"samples": "o/samples.png", "completions": "o/completions.png"}, "mlflow": MLFLOW}),
    (ProbeSummary, {"eval": "probe", "accuracy": 0.3, "accuracy_split": "val", "note": "no test split given",
                    "best": {"layer": "1+2", "l2": 0.01, "val_acc": 0.3},
                    "per_layer": {"1": {"l2": 0.1, "val_acc": 0.25, "eval_acc": 0.25, "l2_searched": [0.01, 0.1, 1.0],
                                        "l2_at_edge": False},
                                  "1+2": {"l2": 0.01, "val_acc": 0.3, "eval_acc": 0.3, "l2_searched": [0.01, 0.1],
                                          "l2_at_edge": True}},
                    "trials": 5, "num_train": 900, "num_val": 100, "confusion_matrix": [[1, 0], [2, 3]],
                    "class_names": ["cat", "dog"],
                    "baselines": {"raw_pixels": {"layer": None, "l2": 1.0, "val_acc": 0.2, "accuracy": 0.2, "trials": 2,
                                                 "l2_searched": [0.01, 1.0]},
                                  "random_init": {"layer": 2, "l2": 0.01, "val_acc": 0.15, "accuracy": 0.15,
                                                  "trials": 2, "l2_searched": [0.01, 1.0], "seed": 0}},
                    "beats_baselines": True, "mlflow": MLFLOW}),
    (ProbeSummary, {"eval": "probe", "accuracy": 0.3, "accuracy_split": "test", "note": "on test",
                    "best": {"layer": 1, "l2": 0.01, "val_acc": 0.3},
                    "per_layer": {"1": {"l2": 0.01, "val_acc": 0.3, "eval_acc": 0.28, "l2_searched": [0.01],
                                        "l2_at_edge": True}},
                    "trials": 1, "num_train": 900, "num_val": 100, "confusion_matrix": [[1]], "class_names": None,
                    "mlflow": MLFLOW}),
    (FinetuneSummary, {"eval": "finetune", "accuracy": 0.4, "accuracy_split": "val", "note": "no test split given",
                       "best": {"lr": 0.003, "lam": 0.5, "epochs": 2, "epochs_run": 2},
                       "best_trial_val_acc_per_epoch": [0.3, 0.4],
                       "trials": [{"config": {"lr": 0.003, "lam": 0.5, "epochs": 2}, "best_val_acc": 0.4,
                                   "epochs_run": 2}],
                       "num_train": 300, "num_val": 100, "confusion_matrix": [[1]], "class_names": ["cat"],
                       "init": "pretrained", "mlflow": MLFLOW}),
]


@pytest.mark.parametrize("kind, written", SUMMARIES)
def test_summaries_read_back_and_write_the_same_json(kind, written):
    summary = kind.from_dict(written)
    assert json.dumps(summary.to_dict()) == json.dumps(written)  # the same keys, in the same order
    assert summary.brief() == {k: v for k, v in written.items() if k != "confusion_matrix"}
    with pytest.raises(ValueError, match="not a"):
        (NllSummary if kind is not NllSummary else SampleSummary).from_dict(written)


def test_cli_defaults_are_the_schemas():
    import argparse

    from igpt.evals.cli import _from_args, register
    from igpt.evals.config import DEFAULT_L2, ProbeSearch

    def parsed(*argv: str) -> argparse.Namespace:
        p = argparse.ArgumentParser()
        register(p.add_subparsers())
        return p.parse_args(["eval", *argv, "--checkpoint", "c", "--data", "d"])

    for schema, cmd in ((NllOptions, "nll"), (SampleOptions, "sample"), (ProbeOptions, "probe"),
                        (SplitOptions, "probe"), (SplitOptions, "finetune")):
        assert _from_args(schema, parsed(cmd)) == schema()
    assert _from_args(EvalRun, parsed("probe")) == EvalRun("c", "d")
    assert _from_args(SampleOptions, parsed("sample", "--top-k", "5")).top_k == 5
    assert ProbeSearch().l2 == list(DEFAULT_L2) == [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert field_default(ProbeSearch, "widen") == 6
    with pytest.raises(ValueError, match="no default"):
        field_default(EvalRun, "checkpoint")


def test_trial_names_are_short_and_tell_trials_apart():
    assert trial_name("", {"layer": 3, "l2": 0.01}) == "L3 l2=0.01"
    assert trial_name("pixels", {"layer": -1, "l2": 0.0001}) == "l2=1e-4 (pixels)"
    assert trial_name("random", {"layer": 12, "l2": 1.0}) == "L12 l2=1 (random)"
    assert trial_name("", {"lr": 0.003, "lam": 0.5, "epochs": 2}) == "lr=3e-3 lam=0.5 epochs=2"
