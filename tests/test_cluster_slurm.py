"""`igpt launch slurm` against a real slurmctld + 2 slurmd (Debian's slurm-wlm) on this host."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.cli import register
from cluster.command import IGPT_ENTRY
from cluster.slurm import REQUEUE_EXIT_CODE, SlurmJob, follow, render_sbatch, submit
from slurm_cluster import missing_slurm_binaries, start_slurm_cluster

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A 2-node SLURM cluster; skipped loudly outside CI when SLURM is not installed, an error in CI."""
    missing = missing_slurm_binaries()
    if missing:
        reason = (f"SLURM binaries missing: {', '.join(missing)} — run `sudo scripts/install_slurm.sh` "
                  "(slurm-wlm + munge) to run the real-cluster tests")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(f"SKIPPING REAL-SLURM TESTS: {reason}")
    cluster = start_slurm_cluster(tmp_path_factory.mktemp("slurm"), num_nodes=2)
    yield cluster
    cluster.stop()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="igpt")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_dry_run_renders_multinode_gpu_script(capsys, tmp_path):
    args = _parse(["launch", "slurm", "configs/cifar10-cpu-tiny.yaml", "train.steps=50", "--nodes", "4",
                   "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj", "--mem", "400G",
                   "--time", "1-00:00:00", "--setup", "module load cuda\nsource /opt/venv/bin/activate",
                   "--log-dir", str(tmp_path / "logs"), "--dry-run"])
    assert args.func(args) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --mem=400G",
                 "#SBATCH --time=1-00:00:00", "#SBATCH --signal=USR1@90", "#SBATCH --requeue",
                 f"#SBATCH --output={tmp_path / 'logs'}/%x-%j.out", "module load cuda"):
        assert line in script, line
    assert "--nproc-per-node 8" in script and "--rdzv-backend c10d" in script
    assert "train configs/cifar10-cpu-tiny.yaml train.steps=50 --resume auto" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    # Every #SBATCH line comes before the first command, or sbatch would ignore it.
    lines = script.splitlines()
    first_cmd = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert not (tmp_path / "logs").exists(), "--dry-run must not write or submit anything"


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="--nodes"):
        render_sbatch(SlurmJob(command=["x"], nodes=0))
    with pytest.raises(ValueError, match="time"):
        render_sbatch(SlurmJob(command=["x"], time="tomorrow"))
    with pytest.raises(ValueError, match="partition"):
        render_sbatch(SlurmJob(command=["x"], partition="gpu a100"))
    args = _parse(["launch", "slurm", "notaconfig", "--dry-run"])
    with pytest.raises(ValueError, match="neither a CONFIG.yaml"):
        args.func(args)


def test_ray_cluster_template_renders(capsys):
    args = _parse(["launch", "slurm", "--ray-cluster", "--nodes", "3", "--gpus-per-node", "4", "--dry-run",
                   "--", "eval", "probe", "--checkpoint", "runs/x"])
    assert args.func(args) == 0
    script = capsys.readouterr().out
    assert "start --head --block" in script and "--num-gpus=4" in script
    assert "eval probe --checkpoint runs/x" in script and "--resume" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_sbatch_test_only_accepts_both_templates(slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    for ray_cluster in (False, True):
        job = SlurmJob(command=["true"], nodes=2, cpus_per_task=1, time="10:00", log_dir=str(tmp_path),
                       ray_cluster=ray_cluster, python=sys.executable)
        verdict, script = submit(job, test_only=True)
        assert "to start at" in verdict and script.is_file()


# A stand-in for `igpt train` that exercises the launcher's plumbing: a real gloo process group
# over torchrun's rendezvous, a USR1 handler that checkpoints and exits with the requeue code,
# and resumption from that checkpoint.
STANDIN = r'''
import json, os, signal, sys, time
import torch, torch.distributed as dist
out, steps, requeue_code = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ckpt = os.path.join(out, "ckpt.json")
step = json.load(open(ckpt))["step"] if os.path.exists(ckpt) else 0
stop = torch.zeros(1)
signal.signal(signal.SIGUSR1, lambda *_: stop.fill_(1))
with open(os.path.join(out, f"start-{os.environ['SLURM_RESTART_COUNT'] if 'SLURM_RESTART_COUNT' in os.environ else 0}-{rank}.json"), "w") as f:
    json.dump({k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_JOB_ID", "SLURM_NODEID", "SLURMD_NODENAME")} | {"step": step}, f)
while step < steps:
    flag = stop.clone(); dist.all_reduce(flag)
    if flag.item() > 0:
        if rank == 0:
            json.dump({"step": step}, open(ckpt + ".tmp", "w")); os.replace(ckpt + ".tmp", ckpt)
        dist.barrier(); sys.exit(requeue_code)
    t = torch.tensor([float(rank + 1)]); dist.all_reduce(t)
    assert t.item() == world * (world + 1) / 2
    step += 1
    open(os.path.join(out, "progress"), "w").write(str(step))
    time.sleep(0.1)
if rank == 0:
    json.dump({"step": step, "world": world}, open(os.path.join(out, "done.json"), "w"))
'''


@pytest.mark.slow
def test_two_node_standin_rendezvous_usr1_requeue_resume(slurm, tmp_path, monkeypatch):
    """2 nodes x 1 task: torchrun rendezvous across slurmd's, USR1 -> checkpoint -> requeue -> finish."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    (tmp_path / "standin.py").write_text(STANDIN)
    job = SlurmJob(command=[sys.executable, str(tmp_path / "standin.py"), str(tmp_path), "150",
                            str(REQUEUE_EXIT_CODE)],
                   nodes=2, cpus_per_task=1, time="10:00", log_dir=str(tmp_path / "logs"), job_name="standin",
                   setup=f"export OMP_NUM_THREADS=1 PYTHONPATH={REPO}")
    job_id, _ = submit(job)
    log = tmp_path / "logs" / f"standin-{job_id}.out"
    _wait_for(lambda: (tmp_path / "progress").exists() and int((tmp_path / "progress").read_text() or 0) >= 5,
              180, "the first run to make progress", log, slurm)
    slurm.cmd("scancel", "--signal=USR1", job_id)
    info = follow(job_id, poll=1.0, timeout=300, env=slurm.env, log=lambda m: None)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text + slurm.logs()
    assert info["Restarts"] == "1", text
    ckpt_step = json.loads((tmp_path / "ckpt.json").read_text())["step"]
    first = [json.loads((tmp_path / f"start-0-{r}.json").read_text()) for r in range(2)]
    second = [json.loads((tmp_path / f"start-1-{r}.json").read_text()) for r in range(2)]
    assert {e["SLURMD_NODENAME"] for e in first} == {"node1", "node2"}
    assert all(e["WORLD_SIZE"] == "2" and e["step"] == 0 and e["SLURM_JOB_ID"] == job_id for e in first)
    assert all(e["step"] == ckpt_step > 0 for e in second), (ckpt_step, second)
    assert json.loads((tmp_path / "done.json").read_text()) == {"step": 150, "world": 2}
    assert "requeueing job" in text and "training stopped by USR1" in text


def _wait_for(pred, timeout: float, what: str, log: Path, cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}\n{log.read_text() if log.exists() else ''}\n{cluster.logs()}")


@pytest.mark.slow
def test_two_node_training_checkpoints_requeues_on_usr1_and_resumes(slurm, cifar_tokens, tmp_path, monkeypatch):
    """`igpt launch slurm --follow`: 2 nodes x 1 torchrun task train the tiny CPU config; USR1 makes the
    training checkpoint, the job requeues itself (hold released) and finishes from that checkpoint."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    launcher = subprocess.Popen(
        [sys.executable, "-c", IGPT_ENTRY, "launch", "slurm", str(REPO / "configs" / "cifar10-cpu-tiny.yaml"),
         f"data.dir={cifar_tokens}", f"train.run_dir={run_dir}", "train.steps=30", "train.log_every=2",
         "train.val_every=1000", "train.sample_every=1000", "checkpoint.every=1000",
         "--nodes", "2", "--cpus-per-task", "1", "--time", "20:00", "--job-name", "e2e",
         "--log-dir", str(logs), "--follow"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job_id = launcher.stdout.readline().strip()
    assert job_id.isdigit(), job_id + launcher.stdout.read()
    log, losses = logs / f"e2e-{job_id}.out", run_dir / "losses.jsonl"
    _wait_for(lambda: losses.exists() and len(losses.read_text().splitlines()) >= 3, 300,
              "the first run to log training steps", log, slurm)
    slurm.cmd("scancel", "--signal=USR1", job_id)
    try:
        follow_out, _ = launcher.communicate(timeout=600)
    finally:
        launcher.kill()
    text = log.read_text()
    assert launcher.returncode == 0, follow_out + text + slurm.logs()
    info = slurm.job_info(job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert "released its BeginTime hold" in follow_out, follow_out

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    preempted = int(run.data.tags["preempted_at_step"])
    assert 0 < preempted < 30 and run.data.tags["slurm_job_id"] == job_id
    assert run.info.status == "FINISHED"
    assert "2 rank(s)" in text and "preemption (SIGUSR1) – saving a checkpoint" in text
    assert f"step_{preempted:08d} at step {preempted}" in text, text  # the second run resumed from it
    assert "requeueing job" in text and f"job {job_id} restart 1" in text
    loss_steps = [int(m.step) for m in client.get_metric_history(run.info.run_id, "loss")]
    assert max(loss_steps) == 30 and min(loss_steps) <= preempted
    complete = json.loads((run_dir / "checkpoints" / "step_00000030" / "COMPLETE.json").read_text())
    assert complete["world_size"] == 2, complete
