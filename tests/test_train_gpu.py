"""The training step on a CUDA device: no host sync per step (torch's sync debug mode turns one into an error)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from igpt.pretrain.distributed import single_process_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
REPO = Path(__file__).resolve().parent.parent

STEPS = r"""
import math, sys, torch
from igpt.pretrain.config import load_config
from igpt.pretrain.metrics import StepRecords
from igpt.pretrain.train import Trainer

cfg = load_config("configs/cifar10-cpu-tiny.yaml", [
    f"data.dir={sys.argv[1]}", f"train.run_dir={sys.argv[2]}", "data.num_workers=0", "train.device=cuda",
    "train.precision=bf16", "deepspeed.zero_stage=0", "model.attn_backend=sdpa", "logging.backend=jsonl",
    f"train.grad_accum={sys.argv[3]}"])
trainer = Trainer(cfg)
batches = iter(trainer.stream)
records = StepRecords("cuda")
for step in range(3):  # warm-up: allocator, cuBLAS handles, first-call lazy init
    records.push(step + 1, 1e-3, trainer.train_step(batches, 1e-3))
seen = records.pop(flush=True)
for step in range(3, 8):
    torch.cuda.set_sync_debug_mode("error")  # the step and its record's async copy: no sync allowed
    records.push(step + 1, 1e-3, trainer.train_step(batches, 1e-3))
    torch.cuda.set_sync_debug_mode("default")
    seen += records.pop()  # the previous step's record: the GPU finished it while this step was queued
seen += records.pop(flush=True)
assert [r.step for r in seen] == list(range(1, 9)), seen
assert all(math.isfinite(r.loss) and not r.skipped and r.grad_norm > 0 and not r.preempt for r in seen), seen
print("OK", [round(r.loss, 4) for r in seen])
"""


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_training_step_makes_no_host_sync(cifar_tokens, tmp_path, grad_accum):
    env = {k: v for k, v in single_process_env().items() if k != "DS_ACCELERATOR"}
    out = subprocess.run([sys.executable, "-c", STEPS, str(cifar_tokens), str(tmp_path / "run"), str(grad_accum)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-3000:] + out.stderr[-4000:]
