"""The precision modes pinned (igpt.pretrain.precision): which tensors are fp32 and which dtype the forward
matmuls use, read off a real DeepSpeed engine built by the training loop (one rank, gloo)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from igpt.pretrain.distributed import single_process_env
from igpt.pretrain.model import IGPT
from igpt.pretrain.precision import eval_autocast, resolve_precision
from igpt.pretrain.presets import model_config
from igpt.pretrain.train import LossModule

REPO = Path(__file__).resolve().parent.parent

# Builds the Trainer for each mode, runs one optimizer step and reports the dtypes it saw.
PROBE = r"""
import json, sys, torch
from igpt.pretrain.config import load_config
from igpt.pretrain.train import Trainer

data, run = sys.argv[1], sys.argv[2]
report = {}
for mode in ("fp32", "bf16", "bf16-module"):
    cfg = load_config("configs/cifar10-cpu-tiny.yaml", [
        f"data.dir={data}", f"train.run_dir={run}/{mode}", "data.num_workers=0", "train.micro_batch_size=4",
        "deepspeed.zero_stage=0", f"train.precision={mode}", "logging.backend=jsonl"])
    trainer = Trainer(cfg)
    seen = {"linear_out": set(), "norm_out": set(), "block_out": set(), "grads": set()}
    model = trainer.model
    for m in model.modules():
        kind = {torch.nn.Linear: "linear_out", torch.nn.LayerNorm: "norm_out"}.get(type(m))
        if kind:
            m.register_forward_hook(lambda mod, i, o, kind=kind: seen[kind].add(str(o.dtype)))
    for block in model.blocks:
        block.register_forward_hook(lambda mod, i, o: seen["block_out"].add(str(o[0].dtype)))
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: seen["grads"].add(str(p.grad.dtype)))
    trainer.train_step(iter(trainer.stream), 1e-3)
    adam = trainer.adam
    report[mode] = {
        **{k: sorted(v) for k, v in seen.items()},
        "module_params": sorted({str(p.dtype) for p in model.parameters()}),
        "optimizer_params": sorted({str(p.dtype) for g in adam.param_groups for p in g["params"]}),
        "adam_state": sorted({str(t.dtype) for st in adam.state.values() for k, t in st.items() if k != "step"}),
        "adam_steps": sorted({int(st["step"]) for st in adam.state.values()}),
    }
    trainer.tracker.close("FINISHED")
    trainer.engine.destroy()
print("REPORT " + json.dumps(report))
"""


@pytest.mark.slow
def test_precision_modes_keep_what_they_promise_in_fp32(cifar_tokens, tmp_path):
    env = {**single_process_env(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(cifar_tokens), str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("REPORT "))[7:])
    f32, bf16 = ["torch.float32"], ["torch.bfloat16"]

    fp32 = report["fp32"]
    assert fp32["linear_out"] == fp32["norm_out"] == fp32["block_out"] == fp32["grads"] == f32
    assert fp32["module_params"] == fp32["optimizer_params"] == fp32["adam_state"] == f32

    auto = report["bf16"]  # autocast: bf16 matmuls, everything else fp32
    assert auto["linear_out"] == bf16
    assert auto["norm_out"] == auto["block_out"] == f32  # layer norms and the residual stream
    assert auto["module_params"] == auto["grads"] == auto["optimizer_params"] == auto["adam_state"] == f32

    module = report["bf16-module"]  # DeepSpeed's bf16: the module is bf16, fp32 master weights and Adam state
    assert module["linear_out"] == module["block_out"] == module["module_params"] == module["grads"] == bf16
    assert module["optimizer_params"] == module["adam_state"] == f32
    assert fp32["adam_steps"] == auto["adam_steps"] == [1]  # one applied update
    # DeepSpeed's bf16 wrapper creates the Adam state with a zero-gradient step at init: the step count
    # (and so Adam's bias correction) runs one ahead of a plain loop's.
    assert module["adam_steps"] == [2]


def test_auto_precision_and_the_evaluation_numerics():
    assert resolve_precision("auto", "cuda") == "bf16" and resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")
    model = IGPT(model_config("igpt-tiny", n_ctx=16, vocab_size=32))
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would give ln V in any precision
    tokens = torch.randint(0, 32, (2, 16))
    loss = LossModule(model, "bf16", "cpu")
    with eval_autocast("cpu"):  # fp32 on CPU: evaluation through LossModule equals the plain fp32 loss
        assert not torch.is_autocast_enabled("cpu")
        assert torch.equal(loss(tokens, evaluate=True), model.loss(tokens))
    assert not torch.equal(loss(tokens), model.loss(tokens))  # the training forward runs in bf16 autocast
