"""Hugging Face ImageGPT interop with tiny random models (no network): export, import, round trips, the
palette's rounding, ``train.init_from`` and the errors of each."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from igpt.data_pipeline.io import file_sha256
from igpt.data_pipeline.palette import PALETTE_FILE, load_palette, save_palette, uniform9_palette
from igpt.data_pipeline.quantize import Quantizer
from igpt.cli import main
from igpt.pretrain.config import DataSection, ModelSection, TrainConfig, load_config
from igpt.pretrain.hf import HF_PREPROCESSOR, export_hf, import_hf, token_disagreement
from igpt.pretrain.hf_convert import clusters_from_palette, nearest_clusters, palette_from_clusters
from igpt.pretrain.init_from import InitMismatch, load_init_state
from igpt.pretrain.model import IGPT, IGPTConfig
from igpt.pretrain.release import CONFIG_FILE, WEIGHTS_FILE, load_model, write_release

transformers = pytest.importorskip("transformers")  # the `hf` extra; `dev` installs it

SIDE, VOCAB = 8, 512
TINY = dict(n_ctx=SIDE * SIDE, vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4, preset="igpt-tiny")


def randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Every parameter N(1, std) for norm weights, N(0, std) otherwise, so that each one shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(noise + 1 if "ln_" in name and name.endswith("weight") else noise)
    return module


def release_of(path: Path, palette: Path, seed: int = 0, **model: object) -> Path:
    """A release dir of a random tiny model (``model`` overrides its fields) with ``palette``."""
    cfg = TrainConfig(model=ModelSection(**{**TINY, **model}), data=DataSection(dir=str(palette.parent)))
    state = randomise(IGPT(cfg.model), seed).state_dict()
    return write_release(path, state, cfg, palette, {"palette_sha256": file_sha256(palette)})


def tokens(n: int = 3, seed: int = 1, vocab: int = VOCAB, length: int = SIDE * SIDE) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def hf_inputs(toks: torch.Tensor, vocab: int) -> torch.Tensor:
    """Hugging Face's input for our tokens: the start token (row V of wte), then all but the last token."""
    return torch.cat([torch.full_like(toks[:, :1], vocab), toks[:, :-1]], dim=1)


def hf_dir_of(path: Path, clusters: np.ndarray, seed: int = 0, **config: object) -> Path:
    """A tiny random ImageGPTForCausalImageModeling saved as Hugging Face does, with ``clusters``."""
    cfg = transformers.ImageGPTConfig(vocab_size=len(clusters) + 1, n_positions=SIDE * SIDE, n_embd=32, n_layer=2,
                                      n_head=4, **config)
    randomise(transformers.ImageGPTForCausalImageModeling(cfg), seed).save_pretrained(path)
    preprocessor = {"image_processor_type": "ImageGPTImageProcessor", "clusters": clusters.tolist(),
                    "do_color_quantize": True, "do_normalize": True, "do_resize": True, "resample": 2,
                    "size": {"height": SIDE, "width": SIDE}}
    (path / HF_PREPROCESSOR).write_text(json.dumps(preprocessor))
    return path


@pytest.fixture(scope="module")
def palette(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("palette") / PALETTE_FILE
    save_palette(uniform9_palette(), path)
    return path


def float_clusters(k: int = 16, seed: int = 0) -> np.ndarray:
    """Random float centres in [-1, 1], most of them between two uint8 colours."""
    return np.random.default_rng(seed).uniform(-1, 1, (k, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------ ours → HF
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu_tanh"])
def test_exported_model_gives_our_logits_and_greedy_completion(palette, tmp_path, activation):
    release = release_of(tmp_path / "release", palette, norm="rms", activation=activation)
    out = export_hf(release, tmp_path / "hf")
    ours, _, _ = load_model(release)
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(out).eval()
    config = json.loads((out / "config.json").read_text())
    assert config["activation_function"] == {"quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}[activation]
    assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == 0
    assert config["vocab_size"] == VOCAB + 1 and config["n_positions"] == SIDE * SIDE

    toks = tokens()
    with torch.no_grad():
        expected = ours(toks).logits
        got = hf(hf_inputs(toks, VOCAB)).logits
        reference = ours.double()(toks).logits  # the same weights in float64
        exact = hf.double()(hf_inputs(toks, VOCAB)).logits
    assert got.shape == (3, SIDE * SIDE, VOCAB) and expected.std() > 1  # logits that carry the weights
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(exact, reference, atol=1e-10, rtol=0)  # the same function, not just close
    ours.float()
    hf.float()

    half = SIDE * SIDE // 2
    completed = ours.generate(prefix=toks[:, :half], n_tokens=SIDE * SIDE, temperature=0)
    hf_completed = hf.generate(hf_inputs(toks[:, :half + 1], VOCAB), max_length=SIDE * SIDE + 1, do_sample=False)
    assert torch.equal(hf_completed[:, 1:], completed)
    assert not torch.equal(completed[:, half:], toks[:, half:])  # a completion, not a copy

    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert np.array_equal(palette_from_clusters(np.asarray(processor.clusters))[0], uniform9_palette())
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                       HF_PREPROCESSOR]


def test_ours_to_hf_to_ours_keeps_weights_and_the_palette_identity(palette, tmp_path):
    release = release_of(tmp_path / "release", palette, norm="rms", activation="quick_gelu")
    back = import_hf(export_hf(release, tmp_path / "hf"), tmp_path / "back")
    assert back.rounding.max_abs < 1e-4 and back.rounding.duplicates == 0
    assert file_sha256(back.release / PALETTE_FILE) == file_sha256(palette)
    a, b = load_file(release / WEIGHTS_FILE), load_file(back.release / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_config(back.release / CONFIG_FILE).model == load_config(release / CONFIG_FILE).model


# ------------------------------------------------------------------------------------------ HF → ours
def test_hf_to_ours_to_hf_is_bitwise_and_reports_the_palette_rounding(tmp_path):
    clusters = float_clusters()
    source = hf_dir_of(tmp_path / "hf", clusters, activation_function="quick_gelu", resid_pdrop=0.0,
                       embd_pdrop=0.0, attn_pdrop=0.0)
    report = import_hf(source, tmp_path / "release")
    again = export_hf(report.release, tmp_path / "hf2")

    a, b = load_file(source / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((again / "config.json").read_text()) == json.loads((source / "config.json").read_text())

    colours = 127.5 * (clusters.astype(np.float64) + 1)
    rounded = np.rint(colours)
    assert report.rounding.max_abs == pytest.approx(np.abs(colours - rounded).max(), abs=1e-9)
    assert 0.3 < report.rounding.max_abs <= 0.5  # the uint8 palette cannot keep float centres
    round_tripped = np.asarray(json.loads((again / HF_PREPROCESSOR).read_text())["clusters"])
    np.testing.assert_allclose(round_tripped, rounded / 127.5 - 1, atol=1e-7)  # the rounded centres
    palette, _ = load_palette(report.release / PALETTE_FILE)
    assert np.array_equal(palette, rounded.astype(np.uint8))
    assert "palette_rounding" in json.loads(_safetensors_header(report.release / WEIGHTS_FILE))["__metadata__"]


def _safetensors_header(path: Path) -> str:
    raw = path.read_bytes()
    return raw[8:8 + int.from_bytes(raw[:8], "little")].decode()


def test_imported_model_gives_hf_logits_and_probe_features_at_each_layer(tmp_path):
    source = hf_dir_of(tmp_path / "hf", float_clusters())  # OpenAI's settings are ImageGPTConfig's defaults
    config = json.loads((source / "config.json").read_text())
    kept = ("model_type", "architectures", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
    (source / "config.json").write_text(json.dumps({k: config[k] for k in kept}))  # the defaults left out
    ours, cfg, _ = load_model(import_hf(source, tmp_path / "release").release)
    assert (cfg.model.norm, cfg.model.activation, cfg.model.vocab_size) == ("rms", "quick_gelu", 16)
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(source).eval()
    toks = tokens(vocab=16)
    with torch.no_grad():
        out = hf(hf_inputs(toks, 16), output_hidden_states=True)
        torch.testing.assert_close(ours(toks).logits, out.logits, atol=1e-5, rtol=0)
        layers = list(range(cfg.model.n_layer + 1))
        features = ours.features(toks, layers)
        # ours: block l's normalised input (its ln_1 output), then the final norm's output; pooled over positions
        theirs = [hf.transformer.h[l].ln_1(out.hidden_states[l]) for l in layers[:-1]] + [out.hidden_states[-1]]
    for layer in layers:
        torch.testing.assert_close(features[layer], theirs[layer].mean(dim=1), atol=1e-5, rtol=0)


def test_imported_release_serves_our_evals(cifar_tokens, tmp_path):
    """A Hugging Face model whose clusters are our shards' palette imports with the same palette identity,
    so ``igpt eval nll`` takes it."""
    source = hf_dir_of(tmp_path / "hf", clusters_from_palette(uniform9_palette()), activation_function="quick_gelu")
    config = json.loads((source / "config.json").read_text())
    config["n_positions"] = 16 * 16  # the shards' resolution
    (source / "config.json").write_text(json.dumps(config))
    state = load_file(source / "model.safetensors")
    state["transformer.wpe.weight"] = torch.randn(256, 32) * 0.1
    from safetensors.torch import save_file

    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    release = import_hf(source, tmp_path / "release").release
    assert file_sha256(release / PALETTE_FILE) == file_sha256(cifar_tokens / PALETTE_FILE)
    assert main(["eval", "nll", "--checkpoint", str(release), "--data", str(cifar_tokens), "--out",
                 str(tmp_path / "nll"), "--device", "cpu", "--limit", "16"]) == 0
    nats = json.loads((tmp_path / "nll" / "summary.json").read_text())["nats_per_token"]
    assert math.isfinite(nats) and nats > 0


# ------------------------------------------------------------------------------------------ the palette
def test_token_disagreement_counts_where_the_hf_processor_tokenises_otherwise(cifar_dir, tmp_path):
    """The uniform 9-bit palette as float centres (levels i*255/7, up to 3/7 of a level from a uint8 colour):
    on CIFAR-10 images, the count equals our tokens against the Hugging Face processor's own, and every
    difference is a tie of the uint8 palette; scattered centres also differ where the rounding moved a boundary."""
    from igpt.data_pipeline.decode import decode_image
    from igpt.data_pipeline.sources import find_images, read_item

    levels = np.arange(8) * 255.0 / 7.0
    colours = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    clusters = (colours / 127.5 - 1).astype(np.float32)
    palette, rounding = palette_from_clusters(clusters)
    assert np.array_equal(palette, uniform9_palette()) and rounding.max_abs == pytest.approx(3 / 7, abs=1e-4)
    sources, n = [str(cifar_dir / "cifar10-train-000000.tar")], 40
    found = token_disagreement(palette, clusters, sources, side=32, limit=n)

    fds: dict[str, int] = {}
    rgb = np.stack([decode_image(read_item(item, fds), 32) for item in find_images(sources).items[:n]])
    processor = transformers.AutoImageProcessor.from_pretrained(hf_dir_of(tmp_path / "hf", clusters))
    theirs = np.asarray(processor(images=list(rgb), do_resize=False, return_tensors="np",
                                  input_data_format="channels_last")["input_ids"]).reshape(-1)
    ours = Quantizer(palette, progress=False).quantize(rgb).reshape(-1)
    assert (found.images, found.pixels) == (n, n * 32 * 32)
    assert np.array_equal(nearest_clusters(rgb, clusters).reshape(-1), theirs)
    assert found.differing == int((ours != theirs).sum()) and 0.01 < found.fraction < 0.5
    assert found.ties == found.differing  # 1-D boundaries: the rounding moves them across integers only at ties
    scattered = float_clusters(64, seed=3)  # centres all over the cube: moved boundaries cross pixels
    uint8, _ = palette_from_clusters(scattered)
    moved = token_disagreement(uint8, scattered, sources, side=32, limit=n)
    assert 0 < moved.ties < moved.differing


# ------------------------------------------------------------------------------------------ compatibility
def test_configs_written_before_the_new_fields_load_as_todays_model(palette, tmp_path):
    release = release_of(tmp_path / "release", palette)
    text = (release / CONFIG_FILE).read_text()
    old = "\n".join(line for line in text.splitlines() if line.strip().split(":")[0] not in ("norm", "activation"))
    (release / CONFIG_FILE).write_text(old + "\n")
    model, cfg, _ = load_model(release)
    assert (cfg.model.norm, cfg.model.activation) == ("layernorm", "gelu_tanh") and cfg.train.init_from is None
    assert isinstance(model.blocks[0].ln_1, torch.nn.LayerNorm) and model.blocks[0].ln_1.bias is not None
    assert IGPTConfig().norm == "layernorm" and IGPTConfig().activation == "gelu_tanh"


# ------------------------------------------------------------------------------------------ errors
def test_init_from_with_another_shape_names_what_differs(palette, tmp_path):
    run_model = IGPTConfig(**{k: v for k, v in TINY.items() if k != "preset"})
    release = release_of(tmp_path / "release", palette, n_embd=48)
    with pytest.raises(InitMismatch, match=r"model\.n_embd: 48 in the source, 32 in this run; 30 parameters differ "
                                           r"\(blocks\.0\.attn\.c_attn\.bias \(144,\) against \(96,\), .* and 27 more\)"):
        load_init_state(release, run_model, file_sha256(palette))
    rms = release_of(tmp_path / "rms", palette, norm="rms", activation="quick_gelu")
    with pytest.raises(InitMismatch, match=r"model\.norm: 'rms' in the source, 'layernorm'.*model\.activation.*"
                                           r"ln_1\.bias missing against \(32,\)"):
        load_init_state(rms, run_model, file_sha256(palette))


def test_train_with_a_wrong_shaped_init_from_is_one_line(cifar_tokens, tmp_path):
    import subprocess
    import sys

    from test_train_support import REPO, TINY as TINY_YAML

    release = release_of(tmp_path / "release", cifar_tokens / PALETTE_FILE, n_ctx=256, n_embd=48)
    cmd = [sys.executable, "-m", "igpt.pretrain.cli", "train", str(TINY_YAML), f"data.dir={cifar_tokens}",
           f"train.run_dir={tmp_path / 'run'}", f"train.init_from={release}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert done.stderr.startswith(f"igpt train: error: train.init_from={release} does not fit this run's model: "
                                  "model.n_embd: 48 in the source, 64 in this run"), done.stderr


@pytest.mark.parametrize("model, words", [
    ({}, "norm='layernorm' (train with model.norm=rms to export)"),
    ({"norm": "rms", "objective": "bert"}, "objective='bert'"),
])
def test_export_refuses_models_hf_cannot_hold(palette, tmp_path, capsys, model, words):
    release = release_of(tmp_path / "release", palette, **model)
    assert main(["export", str(release), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("igpt export: error: ") and words in err[0], err
    assert not (tmp_path / "hf").exists()


def test_import_refuses_a_directory_that_is_not_hf_imagegpt(tmp_path, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    cases = [(tmp_path, "is not a Hugging Face model directory (no config.json)"),
             (tmp_path / "gpt2", "holds a Hugging Face 'gpt2' model, not 'imagegpt'")]
    for path, words in cases:
        assert main(["import", "hf", str(path), "--out", str(tmp_path / "release")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("igpt import hf: error: ") and words in err[0], err
    source = hf_dir_of(tmp_path / "hf", float_clusters(), activation_function="gelu_new")
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "release")]) == 2
    assert "{'activation_function': 'gelu_new'}" in capsys.readouterr().err
    assert not (tmp_path / "release").exists()


# ------------------------------------------------------------------------------------------ train.init_from
@pytest.mark.slow
def test_init_from_trains_from_the_release_and_a_checkpoint_wins(cifar_tokens, tmp_path):
    """2 ranks, ZeRO-3 (the weights go in under GatheredParameters): step 1's loss is the release's NLL on the
    ranks' first batches, step 2's on their second (DeepSpeed's fp32 master copy started there too); a rerun with
    ``--resume auto`` resumes its checkpoint instead and says so; the run dir then exports to Hugging Face."""
    from igpt.data_pipeline.loader import TokenStream
    from test_train_support import TINY as TINY_YAML, all_logs, read_log, run_overrides, step_losses, train_ranks

    model_fields = dict(norm="rms", activation="quick_gelu")  # an imported iGPT's
    release = release_of(tmp_path / "release", cifar_tokens / PALETTE_FILE, n_ctx=256, n_embd=64, **model_fields)
    run = tmp_path / "run"
    args = run_overrides(cifar_tokens, run, deepspeed__zero_stage=3, train__steps=2, optim__lr=1e-7,
                         optim__warmup_steps=0, train__init_from=release, data__record_keys="true",
                         **{f"model__{k}": v for k, v in model_fields.items()})
    assert train_ranks(args, run) == [0, 0], all_logs(run)
    assert f"init_from: starting from the weights of {release} (fresh optimizer and schedule)" in read_log(run)

    cfg, (model, _, _) = load_config(TINY_YAML, args), load_model(release)
    nll = {1: 0.0, 2: 0.0}
    for rank in (0, 1):
        stream = TokenStream(cifar_tokens, "train", cfg.train.micro_batch_size, rank=rank, world_size=2,
                             num_workers=0, seed=cfg.data.seed, shuffle_buffer=cfg.data.shuffle_buffer, with_keys=True)
        recorded = [json.loads(line) for line in (run / f"data_keys.rank{rank}.jsonl").read_text().splitlines()]
        for step, batch in zip((1, 2), stream):
            assert batch["keys"] == recorded[step - 1]["keys"]
            with torch.no_grad():
                nll[step] += float(model.loss(batch["tokens"]).double()) / 2  # the global loss: the ranks' mean
    losses = step_losses(run)
    assert abs(nll[1] - math.log(VOCAB)) > 1  # far from a fresh model's ln V
    assert losses[1] == pytest.approx(nll[1], rel=1e-5)
    assert losses[2] == pytest.approx(nll[2], rel=1e-4)

    longer = [a for a in args if not a.startswith("train.steps=")] + ["train.steps=3"]
    assert train_ranks(longer, run, resume="auto") == [0, 0], all_logs(run)
    log = read_log(run)
    tag = run / "checkpoints" / "step_00000002"
    assert f"init_from: not applied, the run resumes checkpoint {tag} instead of {release}" in log
    assert f"resumed from {tag} at step 2" in log and sorted(step_losses(run)) == [1, 2, 3]

    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(export_hf(run, tmp_path / "hf")).eval()
    trained, _, _ = load_model(run)  # a run dir exports too: its newest checkpoint, consolidated from ZeRO-3
    toks = tokens(length=256)
    with torch.no_grad():  # float64: at width 64 and 256 positions fp32 noise alone reaches 3e-5 on either side
        torch.testing.assert_close(hf.double()(hf_inputs(toks, VOCAB)).logits, trained.double()(toks).logits,
                                   atol=1e-10, rtol=0)
