"""Real DeepSpeed training on CPU (gloo, 2 ranks) on CIFAR-10 token shards with igpt-tiny."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from igpt.data_pipeline.manifest import Manifest
from igpt.pretrain import checkpoint as ckpt
from test_train_support import (REPO, all_logs, killed_after_checkpoint, launch, read_log, run_overrides,
                                step_losses, train_ranks, wait_all)

pytestmark = pytest.mark.slow
N = 4  # steps before the kill; the reference run trains 2N


PATCHES = dict(model__unit="patch", model__patch_size=4, model__order="random")  # 16 patches per 16x16 image


@pytest.mark.parametrize("stage, augment, model, workers", [(2, False, {}, 0), (3, False, {}, 0), (2, True, {}, 0),
                                                             (2, False, PATCHES, 2)],
                         ids=["zero2", "zero3", "zero2-augment", "zero2-patches-random-order-2-workers"])
def test_loss_falls_and_exact_resume_after_sigkill(request, tmp_path, stage, augment, model, workers):
    """2N uninterrupted steps vs N steps, kill -9 of every rank, resume, N more: identical losses; with
    augmentation (flips, random crops of margin shards) too, and for a patch model in random order (each sample's
    order drawn by the loader, here in 2 worker processes per rank)."""
    cifar_tokens = request.getfixturevalue("cifar_tokens_margin" if augment else "cifar_tokens")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    common = dict(deepspeed__zero_stage=stage, train__steps=2 * N, train__precision="fp32", data__hflip=augment,
                  data__random_crop=augment, data__num_workers=workers, **model)
    assert train_ranks(run_overrides(cifar_tokens, ref, **common), ref) == [0, 0], all_logs(ref)
    expected = step_losses(ref)
    assert sorted(expected) == list(range(1, 2 * N + 1))
    first, last = expected[1], sum(expected[s] for s in range(2 * N - 1, 2 * N + 1)) / 2
    assert first == pytest.approx(math.log(512), abs=1e-3)  # zero-initialised head
    assert last < first - 0.1, expected

    cut_args = run_overrides(cifar_tokens, cut, checkpoint__every=N, **common)
    codes = train_ranks(cut_args, cut, program=killed_after_checkpoint(N))
    assert codes == [-signal.SIGKILL, -signal.SIGKILL], all_logs(cut)
    assert [p.name for p in ckpt.find_resumable(cut)] == [ckpt.tag_for(N)]
    assert max(step_losses(cut)) == N

    assert train_ranks(cut_args, cut, resume="auto") == [0, 0], all_logs(cut)
    assert f"resumed from {cut / 'checkpoints' / ckpt.tag_for(N)} at step {N}" in read_log(cut)
    assert step_losses(cut) == expected  # bit-identical per-step losses, steps 1..2N
    # the training size, also on 20x20 margin shards; 16 patches of 4x4
    assert f"n_ctx: {16 if model else 256}" in (cut / "config.yaml").read_text()


def test_zero1_preemption_checkpoint_resume_and_mlflow(cifar_tokens, tmp_path):
    """SIGUSR1 to the ranks → checkpoint → requeue exit code; the resumed run finishes in the same MLflow run."""
    run = tmp_path / "run"
    args = run_overrides(cifar_tokens, run, deepspeed__zero_stage=1, train__steps=400, train__val_every=3,
                         train__sample_every=3, train__sample_count=2, checkpoint__every=1000)
    procs = launch(args, log=tmp_path / "run")
    deadline = time.time() + 300
    while not (run / "losses.jsonl").is_file() or len(step_losses(run)) < 4:
        assert time.time() < deadline and all(p.poll() is None for p in procs), all_logs(run)
        time.sleep(0.2)
    for p in procs:
        os.kill(p.pid, signal.SIGUSR1)
    assert wait_all(procs) == [124, 124], all_logs(run)
    stopped = max(step_losses(run))
    assert 4 <= stopped < 400
    assert [p.name for p in ckpt.find_resumable(run)] == [ckpt.tag_for(stopped)]
    assert "preemption (SIGUSR1)" in read_log(run)

    final = stopped + 3
    resumed_args = [a for a in args if not a.startswith("train.steps=")] + [f"train.steps={final}"]
    assert train_ranks(resumed_args, run, resume="auto") == [0, 0], all_logs(run)
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, final + 1))
    assert (losses[final] + losses[final - 1]) / 2 < losses[1] - 0.1, losses  # ZeRO-1 learns too

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("igpt-pretrain").experiment_id])
    assert len(runs) == 1, "a resumed run must continue its MLflow run"
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.data.params["deepspeed.zero_stage"] == "1" and r.data.params["optim.betas"] == "[0.9, 0.95]"
    for key in ("loss", "bpp", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb", "val_loss", "val_bpp"):
        history = client.get_metric_history(r.info.run_id, key)
        assert history and all(math.isfinite(m.value) for m in history), key
    assert max(m.step for m in client.get_metric_history(r.info.run_id, "loss")) == final
    bpp = client.get_metric_history(r.info.run_id, "bpp")[-1].value
    assert bpp == pytest.approx(client.get_metric_history(r.info.run_id, "loss")[-1].value / math.log(2))
    names = {a.path for a in client.list_artifacts(r.info.run_id, "samples")}
    assert "samples/step_00000003_uncond.png" in names and "samples/step_00000003_completions.png" in names
    png = Path(client.download_artifacts(r.info.run_id, "samples/step_00000003_completions.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corrupt_latest_checkpoint_falls_back_to_previous(cifar_tokens, tmp_path):
    run = tmp_path / "run"
    args = run_overrides(cifar_tokens, run, deepspeed__zero_stage=0, train__steps=4, checkpoint__every=2)
    assert train_ranks(args, run, nprocs=1) == [0], all_logs(run)
    assert [p.name for p in ckpt.find_resumable(run)] == [ckpt.tag_for(4), ckpt.tag_for(2)]
    states = run / "checkpoints" / ckpt.tag_for(4) / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the sha256 can tell
    states.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="skipping checkpoint step_00000004: .*sha256"):
        assert [p.name for p in ckpt.find_resumable(run)] == [ckpt.tag_for(2)]

    longer = [a for a in args if not a.startswith("train.steps=")] + ["train.steps=5"]
    assert train_ranks(longer, run, nprocs=1, resume="auto") == [0], all_logs(run)
    log = read_log(run)
    assert "skipping checkpoint step_00000004" in log
    assert f"resumed from {run / 'checkpoints' / ckpt.tag_for(2)} at step 2" in log


def test_nonfinite_loss_skips_steps_then_stops(cifar_tokens, tmp_path):
    run = tmp_path / "run"
    args = run_overrides(cifar_tokens, run, deepspeed__zero_stage=0, train__steps=20, optim__lr="1e38",
                         optim__warmup_steps=0, train__max_nonfinite=3)
    codes = train_ranks(args, run, nprocs=1)
    log = read_log(run)
    assert codes[0] != 0 and "NonFiniteLossError: 3 consecutive steps with a non-finite loss" in log, log
    skipped = [s for s, loss in step_losses(run).items() if not math.isfinite(loss)]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))


def test_jsonl_tracking_trains_where_mlflow_cannot_be_imported(cifar_tokens, tmp_path):
    """logging.backend=jsonl: a machine without MLflow (the lent GPU box) still trains and records."""
    blocker = tmp_path / "no_mlflow"
    blocker.mkdir()
    (blocker / "mlflow.py").write_text("raise ImportError('mlflow is not installed on this machine')\n")
    path = os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))
    run = tmp_path / "run"
    args = run_overrides(cifar_tokens, run, deepspeed__zero_stage=0, train__steps=3, train__val_every=3,
                         train__sample_every=3, train__sample_count=2, logging__backend="jsonl")
    assert train_ranks(args, run, nprocs=1, env={"PYTHONPATH": path}) == [0], all_logs(run)
    tracking = run / "tracking"
    assert (tracking / "status").read_text().strip() == "FINISHED"
    params = json.loads((tracking / "params.json").read_text())
    assert params["logging.backend"] == "jsonl" and params["optim.betas"] == "[0.9, 0.95]"
    lines = [json.loads(line) for line in (tracking / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [2, 3]
    assert [m["step"] for m in lines if "val_bpp" in m] == [3]
    last = next(m for m in reversed(lines) if "loss" in m)
    assert last["bpp"] == pytest.approx(last["loss"] / math.log(2)) and 0 < last["tokens_per_s"]
    for kind in ("uncond", "completions"):
        png = tracking / "artifacts" / "samples" / f"step_00000003_{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run / "mlflow.db").exists()


def test_validation_on_the_whole_val_split_equals_eval_nll(cifar_tokens, tmp_path):
    """train.val_batches=null: the last logged val loss of a 2-rank ZeRO-3 run in the default bf16 mode (an
    odd number of val batches, so one rank pads) equals ``igpt eval nll`` on the same checkpoint."""
    val = Manifest.load(cifar_tokens).split("val").num_samples
    micro = next(m for m in (4, 5, 3, 6, 7) if -(-val // m) % 2 == 1)  # an odd count: one rank pads
    run = tmp_path / "run"
    args = run_overrides(cifar_tokens, run, deepspeed__zero_stage=3, train__steps=3, train__val_every=3,
                         train__val_batches="null", train__precision="bf16", logging__backend="jsonl",
                         train__micro_batch_size=micro)
    assert train_ranks(args, run) == [0, 0], all_logs(run)
    metrics = [json.loads(line) for line in (run / "tracking" / "metrics.jsonl").read_text().splitlines()]
    logged = [m["val_loss"] for m in metrics if "val_loss" in m]

    out = subprocess.run([sys.executable, "-m", "igpt.cli", "eval", "nll", "--checkpoint", str(run), "--data",
                          str(cifar_tokens), "--out", str(tmp_path / "nll"), "--device", "cpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "nll" / "summary.json").read_text())
    assert summary["images"] == val
    assert logged == [pytest.approx(summary["nats_per_token"], abs=1e-4)]
