"""`igpt launch slurm` against a real slurmctld + 2 slurmd (Debian's slurm-wlm) on this host."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from igpt.cluster.cli import register
from igpt.cluster.command import IGPT_ENTRY
from igpt.cluster.slurm import REQUEUE_EXIT_CODE, SlurmJob, render_sbatch, submit
from igpt.pretrain.checkpointer import PREEMPTED_NOTE_ENV
from slurm_cluster import missing_slurm_binaries, start_slurm_cluster

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A 2-node SLURM cluster; skipped loudly outside CI when SLURM is not installed, an error in CI."""
    missing = missing_slurm_binaries()
    if missing:
        reason = (f"SLURM binaries missing: {', '.join(missing)} — run `sudo scripts/install_test_deps.sh` "
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


def test_preempt_signal_follows_the_config(capsys, tmp_path):
    """checkpoint.preempt_signal=USR2 (where NCCL catches USR1): SLURM sends USR2 before the limit, and the
    node task traps USR2 and TERM; the default stays USR1."""
    args = _parse(["launch", "slurm", "configs/cifar10-cpu-tiny.yaml", "checkpoint.preempt_signal=SIGUSR2",
                   "--signal-seconds", "90", "--log-dir", str(tmp_path), "--dry-run"])
    assert args.func(args) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --signal=USR2@90" in script and "USR1" not in script
    assert 'PREEMPT_SIGNAL=USR2\nTRAPPED_SIGNALS="USR2 TERM"' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert "#SBATCH --signal=USR1@90" in render_sbatch(SlurmJob(command=["x"]))
    assert 'TRAPPED_SIGNALS="TERM"' in render_sbatch(SlurmJob(command=["x"], preempt_signal="term"))


def _node_task(script: str) -> str:
    """The per-node task (a bash program run by srun) embedded in a rendered sbatch script."""
    return script.split("<<'IGPT_NODE_TASK'\n", 1)[1].split("\nIGPT_NODE_TASK\n", 1)[0]


# Stands in for torchrun: reports whether it started with USR2 ignored, exits 1 on TERM after a grace
# period (as torchrun does once its workers stopped), or 1 when told to through the flag file; with
# argv[2] == "note" its "ranks" first note a complete preemption checkpoint in the file that the environment
# variable argv[3] names, as the training does.
FAKE_TORCHRUN = """
import os, signal, sys, time


def stop(*_):
    time.sleep(0.5)
    if sys.argv[2] == "note":
        open(os.environ[sys.argv[3]], "w").write("preempted at step 7, checkpoint step_00000007 complete")
    sys.exit(1)


print("USR2 ignored" if signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN else "USR2 default", flush=True)
signal.signal(signal.SIGTERM, stop)
open(sys.argv[1], "w").close()
while os.path.exists(sys.argv[1]):
    time.sleep(0.05)
stop()
"""


@pytest.mark.parametrize("sig, note", [("USR2", True), ("TERM", True), ("TERM", False), (None, False)])
def test_node_task_requeues_only_a_stop_with_a_complete_preemption_checkpoint(sig, note, tmp_path):
    """Sent to the whole step like slurmstepd does, USR2 (configured) or TERM reaches the node task, which
    outlives the stopping training and exits with the requeue code when the ranks noted a complete preemption
    checkpoint; a signal whose checkpoint failed (no note), or a failure without a signal, keeps exit 1."""
    script = render_sbatch(SlurmJob(command=["x"], preempt_signal="USR2"))
    flag = tmp_path / "running"
    env = dict(os.environ, REQUEUE_EXIT_CODE=str(REQUEUE_EXIT_CODE), PREEMPT_SIGNAL="USR2",
               TRAPPED_SIGNALS="USR2 TERM", SLURM_NODEID="0", TMPDIR=str(tmp_path))
    proc = subprocess.Popen(["bash", "-c", _node_task(script), "igpt-node", sys.executable, "-c", FAKE_TORCHRUN,
                             str(flag), "note" if note else "-", PREEMPTED_NOTE_ENV],
                            env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 30
    while not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if sig is not None:
        os.killpg(proc.pid, getattr(signal, "SIG" + sig))
        time.sleep(0.3)
    flag.unlink()
    out, _ = proc.communicate(timeout=30)
    assert out.startswith("USR2 ignored"), out
    if note:
        assert proc.returncode == REQUEUE_EXIT_CODE, (proc.returncode, out)
        assert f"node 0: training stopped by {sig} (exit 1), preempted at step 7, checkpoint step_00000007 complete" \
            in out, out
    else:
        assert proc.returncode == 1, (proc.returncode, out)
        assert ("not requeued" in out) == (sig is not None), out
    assert [p.name for p in tmp_path.iterdir()] == [], "the note's temporary dir is left behind"


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="--nodes"):
        render_sbatch(SlurmJob(command=["x"], nodes=0))
    with pytest.raises(ValueError, match="time"):
        render_sbatch(SlurmJob(command=["x"], time="tomorrow"))
    with pytest.raises(ValueError, match="partition"):
        render_sbatch(SlurmJob(command=["x"], partition="gpu a100"))
    with pytest.raises(ValueError, match="--signal-seconds"):
        render_sbatch(SlurmJob(command=["x"], signal_seconds=-1))
    for bad in ("KILL", "BOGUS"):
        with pytest.raises(ValueError, match=f"preemption signal '{bad}'"):
            render_sbatch(SlurmJob(command=["x"], preempt_signal=bad))
    args = _parse(["launch", "slurm", "configs/cifar10-cpu-tiny.yaml", "checkpoint.preempt_signal=BOGUS", "--dry-run"])
    with pytest.raises(ValueError, match="checkpoint.preempt_signal"):
        args.func(args)
    args = _parse(["launch", "slurm", "notaconfig", "--dry-run"])
    with pytest.raises(ValueError, match="neither a CONFIG.yaml"):
        args.func(args)


def _one_line_error(argv: list[str], capsys) -> str:
    """Run ``igpt ARGV`` in this process; return its one error line (exit code 2, nothing on stdout)."""
    from igpt.runner import add_common_options, run

    parser = argparse.ArgumentParser(prog="igpt")
    register(parser.add_subparsers(dest="command", required=True))
    assert run(add_common_options(parser).parse_args(argv)) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, (out, err)
    return err


@pytest.mark.parametrize("option", ["--sbatch-arg=--qos=high\ntouch /tmp/pwned", "--sbatch-arg=--qos=a b",
                                    "--sbatch-arg=--qos=high\r", "--srun-arg=--x=1\ntouch /tmp/pwned"])
def test_sbatch_and_srun_args_cannot_start_a_shell_line(option, capsys, tmp_path):
    """An #SBATCH line is a shell comment: a newline in it would start a live command, and quoting does not
    protect it; srun options are quoted on a command line, where only control characters are refused."""
    err = _one_line_error(["launch", "slurm", "--ray-cluster", "--log-dir", str(tmp_path), option, "--dry-run"],
                          capsys)
    assert err.startswith("igpt launch slurm: error: ") and option.partition("=")[0] in err, err


@pytest.mark.parametrize("name", ["run\ntouch pwned", "run with space", "run\x1b[2J"])
def test_working_directory_names_are_checked_as_rendered(name, capsys, tmp_path, monkeypatch):
    """The job's working directory is the submitting one, made absolute: its name goes into #SBATCH --chdir."""
    workdir = tmp_path / name
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    err = _one_line_error(["launch", "slurm", "--ray-cluster", "--log-dir", str(tmp_path), "--dry-run"], capsys)
    assert "the working directory" in err, err
    err = _one_line_error(["launch", "slurm", "--ray-cluster", "--log-dir", "logs", "--dry-run"], capsys)
    assert "--log-dir" in err, err  # relative, inside the bad directory


def test_requeue_exit_code_matches_the_training():
    from igpt.pretrain.config import CheckpointSection

    assert REQUEUE_EXIT_CODE == CheckpointSection().preempt_exit_code


def test_ray_cluster_template_renders(capsys):
    args = _parse(["launch", "slurm", "--ray-cluster", "--nodes", "3", "--gpus-per-node", "4", "--dry-run",
                   "--", "eval", "probe", "--checkpoint", "runs/x", "--data", "shards/"])
    assert args.func(args) == 0
    script = capsys.readouterr().out
    assert "start --head --block" in script and "--num-gpus=4" in script
    assert "eval probe --checkpoint runs/x --data shards/" in script and "--resume" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def _run_ray_template(tmp_path: Path, capsys, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, str]:
    """Render the Ray template (3 nodes, a driver) and run it under bash with stand-ins for scontrol, srun and the
    interpreter; srun and the interpreter log their token settings and arguments. Returns (the run, their log)."""
    bin_dir, calls, logs = tmp_path / "bin", tmp_path / "calls", tmp_path / "logs$HOME"
    bin_dir.mkdir()
    logs.mkdir()
    for name in ("srun", "python"):
        (bin_dir / name).write_text(f'#!/bin/bash\n'
                                    f'echo "{name} $RAY_AUTH_MODE ${{RAY_AUTH_TOKEN_PATH:-}} $*" >>{calls}\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$2" = hostnames ] && printf "n1\\nn2\\nn3\\n" || '
                                      'echo "NodeName=$3 NodeAddr=10.9.8.7 Arch=x86_64"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    args = _parse(["launch", "slurm", "--ray-cluster", "--nodes", "3", "--log-dir", str(logs), "--python",
                   str(bin_dir / "python"), "--dry-run", "--", "eval", "probe", "--checkpoint", "r", "--data", "d"])
    assert args.func(args) == 0
    script = capsys.readouterr().out
    assert "0.0.0.0" not in script, "no listener on every interface"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_TOKEN", "SLURM"))} | env
    env |= {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "igpt",
            "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_NNODES": "3", "SLURM_CPUS_PER_TASK": "2"}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    return proc, calls.read_text() if calls.exists() else ""


def test_ray_cluster_runs_every_process_with_the_jobs_private_token(tmp_path, capsys):
    """Token authentication on every process of the Ray template: a fresh 0600 token file beside the logs, its
    path and RAY_AUTH_MODE=token exported to the head's and the workers' `ray start` steps, the wait for the head
    and the driver (overriding a RAY_AUTH_MODE=disabled of the submitting shell); the dashboard on HEAD only."""
    proc, calls = _run_ray_template(tmp_path, capsys, {"RAY_AUTH_MODE": "disabled"})
    token_file = tmp_path / "logs$HOME" / "igpt-4242.ray-token"
    assert proc.returncode == 0, proc.stdout + proc.stderr + calls
    assert f"token {token_file} (new)" in proc.stdout, proc.stdout
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", token_file.read_text())
    assert [p.name for p in token_file.parent.iterdir()] == [token_file.name], "no temp file left"
    lines = calls.splitlines()
    kinds = [("srun", "start --head --block"), ("python", "- 10.9.8.7:"), ("srun", "start --block --address"),
             ("python", "eval probe --checkpoint r --data d")]
    assert len(lines) == len(kinds), calls  # the steps run in the background: in any order
    for program, what in kinds:
        line = next(ln for ln in lines if ln.startswith(program) and what in ln)
        assert line.startswith(f"{program} token {token_file} "), line
    assert "--dashboard-host=10.9.8.7" in next(ln for ln in lines if "--head" in ln), calls


def test_ray_cluster_uses_the_token_of_the_submitting_shell(tmp_path, capsys):
    """A RAY_AUTH_TOKEN_PATH given to the job is used as it is (no new token); one that is no file stops the job."""
    mine = tmp_path / "my-token"
    mine.write_text("ab" * 32)
    proc, calls = _run_ray_template(tmp_path, capsys, {"RAY_AUTH_TOKEN_PATH": str(mine)})
    assert proc.returncode == 0 and f"token {mine}," in proc.stdout, proc.stdout + proc.stderr
    assert len(calls.splitlines()) == 4 and all(f"token {mine} " in line for line in calls.splitlines()), calls
    assert list((tmp_path / "logs$HOME").iterdir()) == []
    shutil.rmtree(tmp_path / "bin")
    shutil.rmtree(tmp_path / "logs$HOME")
    (tmp_path / "calls").unlink()
    proc, calls = _run_ray_template(tmp_path, capsys, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    assert proc.returncode == 1 and "is not a readable token file" in proc.stderr and calls == "", proc.stderr


def test_sbatch_test_only_accepts_both_templates(slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    for ray_cluster in (False, True):
        job = SlurmJob(command=["true"], nodes=2, cpus_per_task=1, time="10:00", log_dir=str(tmp_path),
                       ray_cluster=ray_cluster, python=sys.executable)
        verdict, script = submit(job, test_only=True)
        assert "to start at" in verdict and script.is_file()


def _wait_for(pred, timeout: float, what: str, log: Path, cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}\n{log.read_text() if log.exists() else ''}\n{cluster.logs()}")


def _train_and_signal(slurm, cifar_tokens, tmp: Path, sig: str, name: str, overrides: list[str]) -> dict:
    """`igpt launch slurm --follow`: 2 nodes x 1 torchrun task train the tiny CPU config; once it logs
    steps, `scancel --signal=SIG` (to every process of the job's steps, as SLURM does). Returns what the
    tests below check."""
    run_dir, logs = tmp / "run", tmp / "logs"
    launcher = subprocess.Popen(
        [sys.executable, "-c", IGPT_ENTRY, "launch", "slurm", str(REPO / "configs" / "cifar10-cpu-tiny.yaml"),
         f"data.dir={cifar_tokens}", f"train.run_dir={run_dir}", "train.steps=30", "train.log_every=2",
         "train.val_every=1000", "train.sample_every=1000", "checkpoint.every=1000", *overrides,
         "--nodes", "2", "--cpus-per-task", "1", "--time", "20:00", "--job-name", name,
         "--log-dir", str(logs), "--follow"],
        cwd=REPO, env=slurm.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        job_id = launcher.stdout.readline().strip()
        assert job_id.isdigit(), job_id + launcher.stdout.read()
        log, losses = logs / f"{name}-{job_id}.out", run_dir / "losses.jsonl"
        _wait_for(lambda: losses.exists() and len(losses.read_text().splitlines()) >= 3, 300,
                  "the first run to log training steps", log, slurm)
        slurm.cmd("scancel", f"--signal={sig}", job_id)
        follow_out, _ = launcher.communicate(timeout=600)
    finally:
        launcher.kill()
    return {"job_id": job_id, "run_dir": run_dir, "log": log.read_text(), "follow_out": follow_out,
            "returncode": launcher.returncode, "info": slurm.job_info(job_id), "tmp": tmp}


@pytest.fixture(scope="module")
def preempted_training(slurm, cifar_tokens, tmp_path_factory) -> dict:
    """The configured preemption signal: checkpoint.preempt_signal=USR2 and `scancel --signal=USR2`."""
    return _train_and_signal(slurm, cifar_tokens, tmp_path_factory.mktemp("e2e"), "USR2", "e2e",
                             ["checkpoint.preempt_signal=USR2"])


def _assert_requeued_and_resumed(r: dict, sig: str, slurm) -> None:
    """The training checkpointed on ``sig`` within its steps, the job requeued itself once (its BeginTime hold
    released by --follow) and finished from that checkpoint; job id, run dir and MLflow run are linked."""
    from mlflow.tracking import MlflowClient

    job_id, run_dir, text = r["job_id"], r["run_dir"], r["log"]
    assert r["returncode"] == 0, r["follow_out"] + text + slurm.logs()
    assert r["info"]["JobState"] == "COMPLETED" and r["info"]["Restarts"] == "1", r["info"]
    assert "released its BeginTime hold" in r["follow_out"], r["follow_out"]

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    preempted = int(run.data.tags["preempted_at_step"])
    assert 0 < preempted < 30 and run.data.tags["slurm_job_id"] == job_id
    assert run.info.status == "FINISHED"
    assert "2 rank(s)" in text and f"preemption (SIG{sig}) – saving a checkpoint" in text, text
    assert f"training stopped by {sig} (exit 1), preempted at step {preempted}, checkpoint step_{preempted:08d} " \
        "complete" in text, text  # the ranks' note of a complete preemption checkpoint: the only way to a requeue
    assert f"step_{preempted:08d} at step {preempted}" in text, text  # the second run resumed from it
    assert "requeueing job" in text and f"job {job_id} restart 1" in text
    loss_steps = [int(m.step) for m in client.get_metric_history(run.info.run_id, "loss")]
    assert max(loss_steps) == 30 and min(loss_steps) <= preempted
    complete = json.loads((run_dir / "checkpoints" / "step_00000030" / "COMPLETE.json").read_text())
    assert complete["world_size"] == 2 and complete["step"] == 30, complete


@pytest.mark.slow
def test_two_node_training_checkpoints_requeues_on_the_configured_signal_and_resumes(preempted_training, slurm):
    """USR2, configured as checkpoint.preempt_signal, is what SLURM's --signal sends before the time limit."""
    _assert_requeued_and_resumed(preempted_training, "USR2", slurm)


@pytest.mark.slow
def test_two_node_training_survives_term_from_slurmctld(slurm, cifar_tokens, tmp_path):
    """TERM (SLURM preemption, scancel) through the real slurmctld, with 2 DataLoader workers per rank: torchrun
    forwards it and exits 1, the ranks checkpoint, the node tasks map the stop to the requeue code."""
    r = _train_and_signal(slurm, cifar_tokens, tmp_path, "TERM", "term", ["data.num_workers=2"])
    _assert_requeued_and_resumed(r, "TERM", slurm)
    assert "Received 15 death signal, shutting down workers" in r["log"], r["log"]  # torchrun's own handler


@pytest.mark.slow
def test_ray_cluster_inside_slurm_runs_a_probe_eval(preempted_training, slurm, cifar_tokens):
    """The Ray-in-SLURM template on one node: Ray head in a job step, `igpt eval probe` as the driver."""
    from mlflow.tracking import MlflowClient

    run_dir, tmp = preempted_training["run_dir"], preempted_training["tmp"]
    ray_tmp = tempfile.mkdtemp(prefix="igs", dir="/tmp")  # keeps other tests' ray.init() away from it
    # The template turns token authentication on (over the shell's RAY_AUTH_MODE=disabled) with the job's own token.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    store = f"sqlite:///{run_dir / 'mlflow.db'}"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", IGPT_ENTRY, "launch", "slurm", "--ray-cluster", "--nodes", "1",
             "--cpus-per-task", "2", "--time", "15:00", "--job-name", "ray", "--log-dir", str(tmp / "logs"),
             "--dashboard-port", str(dashboard_port), "--follow", "--",
             "eval", "probe", "--checkpoint", str(run_dir), "--data", str(cifar_tokens), "--out", str(tmp / "probe"),
             "--device", "cpu", "--limit", "200", "--layers", "mid", "--tracking-uri", store,
             "--set", "probe.l2=[0.01]", "--set", "probe.max_iter=50", "--verbose"],  # Ray's INFO lines
            cwd=REPO, env=dict(slurm.env, RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled"),
            capture_output=True, text=True, timeout=600)
    finally:
        _kill_processes_mentioning(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    job_id = proc.stdout.split()[0]
    text = (tmp / "logs" / f"ray-{job_id}.out").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr + text
    assert "[igpt-ray] driver exited with 0" in text and "Connected to Ray cluster" in text, text
    token_file = tmp / "logs" / f"ray-{job_id}.ray-token"
    assert f"token {token_file} (new)" in text and token_file.stat().st_mode & 0o777 == 0o600, text
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("igpt-eval").experiment_id])
    assert any(r.info.status == "FINISHED" and r.data.metrics for r in runs), runs


def _kill_processes_mentioning(marker: str) -> None:
    """Kill, by PID, any process whose command line names ``marker`` (a temp dir only our job used)."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
