"""Config schema and merge, the generated DeepSpeed dict, and the tracking arithmetic (no processes started)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from igpt.pretrain.config import ConfigError, config_from_checkpoint, load_config, save_config, to_dict
from igpt.pretrain.deepspeed_config import build_deepspeed_config, loop_clips_gradients
from igpt.pretrain.precision import resolve_precision
from igpt.pretrain.tracking import PEAK_TFLOPS, mfu, peak_flops

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
TINY = next(p for p in CONFIGS if p.name == "cifar10-cpu-tiny.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_loads_and_builds_a_deepspeed_config(path):
    cfg = load_config(path, ["data.dir=/data/tokens"])
    device = "cuda" if cfg.train.device == "cuda" else "cpu"
    ds = build_deepspeed_config(cfg, device)
    assert ds["bf16"]["enabled"] is False  # bf16 on GPU is autocast over an fp32 module (igpt.pretrain.precision)
    assert resolve_precision(cfg.train.precision, device) == ("bf16" if device == "cuda" else "fp32")
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.0
    model = cfg.model
    assert model.n_layer >= 2 and model.activation_checkpointing == cfg.model.activation_checkpointing


def test_overrides_win_over_the_yaml_and_types_are_converted():
    cfg = load_config(TINY, ["data.dir=/x", "optim.lr=0.01", "train.steps=7", "deepspeed.zero_stage=3",
                             "optim.betas=[0.8,0.9]"])
    assert cfg.optim.lr == 0.01 and cfg.train.steps == 7 and cfg.deepspeed.zero_stage == 3
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.train.micro_batch_size == 16  # from the YAML, not the schema default


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"),
    ("trian.steps=3", "trian"),
    ("train.steps=many", "train.steps"),
    ("train.device=tpu", "train.device"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("train.precision=fp16", "train.precision"),
    ("train.val_batches=0", "train.val_batches"),
    ("checkpoint.preempt_signal=KILL", "checkpoint.preempt_signal"),
    ("checkpoint.preempt_signal=BOGUS", "checkpoint.preempt_signal"),
    ("deepspeed.offload_param=cpu", "deepspeed.offload_param"),
])
def test_bad_keys_and_values_are_errors_that_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, ["data.dir=/x", override])


@pytest.mark.parametrize("override", [
    "data.num_workers=-5", "data.shuffle_buffer=-1", "data.seed=-1", "train.seed=-1", "train.sample_count=-1",
    "train.sample_temperature=-1", "train.sample_temperature=inf", "optim.lr=nan", "optim.lr=inf", "optim.lr=0",
    "optim.min_lr=1", "optim.eps=-1", "optim.eps=nan", "optim.weight_decay=nan", "optim.grad_clip=-1",
    "optim.grad_clip=inf", "optim.betas=[0.9,nan]", "checkpoint.preempt_exit_code=0",
    "checkpoint.preempt_exit_code=1", "checkpoint.preempt_exit_code=2", "checkpoint.preempt_exit_code=137",
    "checkpoint.preempt_exit_code=999", "model.vocab_size=70000", "model.init_std=inf", "logging.peak_tflops=nan",
])
def test_out_of_range_numbers_are_one_line_errors_naming_the_key_and_value(override):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["data.dir=/x", override])
    message = str(err.value)
    assert f"config key {key!r} must be" in message and "\n" not in message, message
    assert _numbers(message.rsplit("got ", 1)[1]) == _numbers(value), message  # -1 reads as -1.0 for a float


def _numbers(text: str) -> str:
    return str([float(x) for x in re.findall(r"-?(?:[\d.]+(?:e-?\d+)?|nan|inf)", text)])


def test_the_edges_of_the_ranges_are_accepted():
    cfg = load_config(TINY, ["data.dir=/x", "data.num_workers=0", "data.shuffle_buffer=0", "optim.grad_clip=0",
                             "optim.min_lr=3e-4", "optim.lr=3e-4", "train.sample_temperature=0",
                             "checkpoint.preempt_exit_code=3", "model.vocab_size=65536"])
    assert cfg.optim.grad_clip == 0 and cfg.checkpoint.preempt_exit_code == 3 and cfg.model.vocab_size == 65536


@pytest.mark.parametrize("override, words", [
    ("model.vocab_size=7", "config key 'model.vocab_size' = 7 is smaller than the palette of"),
    ("model.n_ctx=255", "config key 'model.n_ctx' = 255 does not fit"),
    ("model.n_ctx=1024", "its 16x16 images are 256 tokens"),
])
def test_training_refuses_a_model_that_does_not_fit_the_data(cifar_tokens, tmp_path, capfd, override, words):
    from igpt.cli import main

    rc = main(["train", str(TINY), f"data.dir={cifar_tokens}", f"train.run_dir={tmp_path / 'run'}", "train.steps=1",
               override])
    err = capfd.readouterr().err.strip()
    assert rc == 2 and err.startswith("igpt train: error: ") and words in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()  # refused at start, before anything is written


def test_unknown_key_in_a_yaml_file_and_missing_data_dir(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dir: /x\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"data\.dir"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TINY, ["data.dir"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(TINY, ["data.dir=/x", "deepspeed.extra.zero_optimization.overlap_comm=true"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_a_checkpoints_config_reads_back_with_defaults_for_later_fields():
    cfg = load_config(TINY, ["data.dir=/data/tokens", "model.norm=rms", "train.grad_accum=3",
                             "deepspeed.extra.zero_optimization.reduce_bucket_size=7"])
    assert config_from_checkpoint(to_dict(cfg)) == cfg
    old = to_dict(cfg)  # as an older (or newer) version saved it: fields missing, unknown keys present
    del old["model"]["norm"], old["model"]["activation"], old["logging"]
    old["model"]["retired_field"], old["gone_section"] = 1, {"x": 2}
    back = config_from_checkpoint(old)
    assert back.model.norm == "layernorm" and back.model.activation == "gelu_tanh"  # IGPTConfig's defaults
    assert back.model.n_layer == cfg.model.n_layer and back.deepspeed.extra == cfg.deepspeed.extra
    assert back.global_batch(2) == cfg.train.micro_batch_size * 3 * 2
    cfg.model.n_ctx = 64
    assert cfg.tokens_per_step(2) == cfg.global_batch(2) * 64


def test_deepspeed_dict_from_our_config_and_the_escape_hatch():
    cfg = load_config(TINY, ["data.dir=/x", "train.micro_batch_size=3", "train.grad_accum=5", "optim.grad_clip=0.5",
                             "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu", "deepspeed.offload_param=cpu",
                             "deepspeed.extra.zero_optimization.reduce_bucket_size=1000",
                             "deepspeed.extra.wall_clock_breakdown=true"])
    ds = build_deepspeed_config(cfg, "cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.5 and ds["zero_allow_untested_optimizer"] is True
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == 1000 and ds["wall_clock_breakdown"] is True
    assert zero["contiguous_gradients"] is False  # on CPU: no flat-buffer copy of each gradient
    assert "contiguous_gradients" not in build_deepspeed_config(cfg, "cuda")["zero_optimization"]  # DeepSpeed's
    kept = load_config(TINY, ["data.dir=/x", "deepspeed.extra.zero_optimization.contiguous_gradients=true"])
    assert build_deepspeed_config(kept, "cpu")["zero_optimization"]["contiguous_gradients"] is True
    auto_gpu = build_deepspeed_config(load_config(TINY, ["data.dir=/x", "train.precision=auto"]), "cuda")
    assert auto_gpu["bf16"]["enabled"] is False and auto_gpu["gradient_clipping"] == 1.0  # ZeRO-2: DeepSpeed clips
    module = build_deepspeed_config(load_config(TINY, ["data.dir=/x", "train.precision=bf16-module"]), "cuda")
    assert module["bf16"]["enabled"] is True


@pytest.mark.parametrize("stage, precision, loop_clips", [
    (0, "fp32", True), (0, "bf16", True), (0, "bf16-module", False), (1, "bf16", False), (2, "fp32", False),
    (3, "bf16", False),
])
def test_gradient_clipping_belongs_to_the_loop_only_at_zero0_with_an_fp32_module(stage, precision, loop_clips):
    cfg = load_config(TINY, ["data.dir=/x", f"deepspeed.zero_stage={stage}", f"train.precision={precision}",
                             "optim.grad_clip=0.7"])
    assert loop_clips_gradients(stage, precision) is loop_clips
    assert build_deepspeed_config(cfg, "cpu")["gradient_clipping"] == (0.0 if loop_clips else 0.7)


def test_peak_flops_table_override_and_mfu():
    assert PEAK_TFLOPS["H100"] == PEAK_TFLOPS["H200"] == 989.0 and PEAK_TFLOPS["A100"] == 312.0
    assert peak_flops("cpu") == PEAK_TFLOPS["cpu"] * 1e12
    assert peak_flops("cpu", override_tflops=2.5) == 2.5e12
    # 1e5 tokens/s over 2 devices at 1e9 FLOPs/token on 1e14 FLOP/s devices: 50% each
    assert mfu(1e5, 1e9, 2, 1e14) == pytest.approx(0.5)
