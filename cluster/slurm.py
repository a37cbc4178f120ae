"""SLURM jobs: render an sbatch script from a template, submit it, follow it through requeues.

``render_sbatch(SlurmJob(...))`` fills ``templates/sbatch.sh.tmpl`` (multi-node torchrun
training) or ``templates/ray_on_slurm.sh.tmpl`` (a Ray cluster inside the allocation);
``submit`` hands the script to ``sbatch`` and returns the job id; ``follow`` polls the job until
it ends, releasing the BeginTime hold SLURM puts on a requeued job so that it restarts at once.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from igpt.errors import UserError

TEMPLATES = files("igpt.cluster.templates")  # package data
# The exit code that means "checkpointed after a signal, requeue me": the default of the training's
# `checkpoint.preempt_exit_code` (tests/test_cluster_slurm.py checks that they agree). torchrun
# reports any failed rank as 1 (and exits 1 after forwarding a TERM), so each node's task turns
# "stopped non-zero, and the ranks noted a complete preemption checkpoint" (the file named by
# `igpt.pretrain.checkpointer.PREEMPTED_NOTE_ENV`) into this code, which srun passes on to the batch
# script; a stop without that note (the checkpoint failed) keeps its non-zero code and is not requeued.
REQUEUE_EXIT_CODE = 124
_UNCATCHABLE = ("KILL", "STOP")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # ASCII control characters: newline, CR, NUL, ESC …
_UNSAFE_IN_SBATCH = re.compile(r"[\s\x00-\x1f\x7f]")
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$|^UNLIMITED$|^INFINITE$")
_FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                 "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@dataclass
class SlurmJob:
    """What one sbatch script needs. ``command`` is the argv each rank runs (after torchrun)."""

    command: list[str]
    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int | None = None  # default: gpus_per_node, or 1 on CPU
    cpus_per_task: int = 8
    mem: str | None = None  # per node (= per task), e.g. "64G"
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str = "igpt"
    log_dir: str = "slurm-logs"
    workdir: str = "."  # the job's working directory (relative paths in the command resolve here)
    setup: str = ""  # shell lines run before anything else (module load, venv, container)
    python: str = field(default_factory=lambda: sys.executable)
    preempt_signal: str = "USR1"  # the training's `checkpoint.preempt_signal`, sent signal_seconds before the limit
    signal_seconds: int = 90
    requeue_exit_code: int = REQUEUE_EXIT_CODE
    sbatch_args: list[str] = field(default_factory=list)  # extra `#SBATCH` options, e.g. --qos=high
    srun_args: list[str] = field(default_factory=list)  # extra srun options, e.g. --container-image=…
    ray_cluster: bool = False  # render the Ray-cluster template instead of torchrun training
    dashboard_port: int = 8265


def render_template(template: str, values: dict[str, object]) -> str:
    """Replace every ``{{name}}`` in ``template``; an unknown or unused name is an error."""
    names = set(_PLACEHOLDER.findall(template))
    missing, unused = names - values.keys(), values.keys() - names
    if missing or unused:
        raise UserError(f"template placeholders missing values: {sorted(missing)}, "
                         f"values without placeholder: {sorted(unused)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def signal_name(name: str) -> str:
    """``usr2``, ``SIGUSR2`` → ``USR2`` (the form ``#SBATCH --signal`` and ``trap`` take); a ValueError for
    an unknown signal or one that cannot be caught."""
    key = name.strip().upper().removeprefix("SIG")
    if "SIG" + key not in signal.Signals.__members__ or key in _UNCATCHABLE:
        raise UserError(f"preemption signal {name!r} (checkpoint.preempt_signal) is not a signal the job can catch; "
                         "e.g. USR1, USR2")
    return key


def _sbatch_values(job: SlurmJob) -> list[tuple[str, str | None]]:
    """(option, value) of every user value that goes into an ``#SBATCH`` line; paths as rendered (absolute)."""
    return [("--job-name", job.job_name), ("--log-dir", os.path.abspath(job.log_dir)),
            ("the working directory", os.path.abspath(job.workdir)), ("--partition", job.partition),
            ("--account", job.account), ("--mem", job.mem), *(("--sbatch-arg", a) for a in job.sbatch_args)]


def _check(job: SlurmJob) -> None:
    if job.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {job.nodes}")
    if job.gpus_per_node < 0 or job.cpus_per_task < 1:
        raise UserError(f"bad resources: gpus_per_node={job.gpus_per_node}, cpus_per_task={job.cpus_per_task}")
    if job.procs_per_node is not None and job.procs_per_node < 1:
        raise UserError(f"--procs-per-node must be >= 1, got {job.procs_per_node}")
    if not _TIME.match(job.time):
        raise UserError(f"--time {job.time!r} is not a SLURM time (MM, HH:MM:SS, D-HH:MM:SS)")
    if not 0 <= job.signal_seconds <= 65535:
        raise UserError(f"--signal-seconds must be in 0..65535, got {job.signal_seconds}")
    if not 1 <= job.requeue_exit_code <= 255:
        raise UserError(f"requeue exit code must be in 1..255, got {job.requeue_exit_code}")
    for label, value in _sbatch_values(job):
        if value is not None and (not value or _UNSAFE_IN_SBATCH.search(value)):
            raise UserError(f"{label} {value!r} must be non-empty and contain no whitespace or control characters "
                             "(it goes into an #SBATCH line, where quoting does not protect)")
    for value in job.srun_args:
        if _CONTROL.search(value):
            raise UserError(f"--srun-arg {value!r} must contain no control characters (newline, CR, NUL …)")
    if not job.command and not job.ray_cluster:
        raise UserError("no command to run")


def render_sbatch(job: SlurmJob) -> str:
    """The sbatch script for ``job`` (torchrun training, or a Ray cluster when ``ray_cluster``)."""
    _check(job)
    options = [f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []
    options += [f"--partition={job.partition}"] if job.partition else []
    options += [f"--account={job.account}"] if job.account else []
    options += [f"--mem={job.mem}"] if job.mem else []
    options += job.sbatch_args
    values: dict[str, object] = {
        "job_name": job.job_name,
        "nodes": job.nodes,
        "cpus_per_task": job.cpus_per_task,
        "time": job.time,
        "log_dir": os.path.abspath(job.log_dir),
        "workdir": os.path.abspath(job.workdir),
        "sbatch_options": "\n".join(f"#SBATCH {shlex.quote(o)}" for o in options),
        "setup": job.setup.strip() or ":",
        "python": shlex.quote(job.python),
        "command": " ".join(shlex.quote(a) for a in job.command),
        "srun_options": " ".join(shlex.quote(a) for a in job.srun_args),
    }
    if job.ray_cluster:
        name = "ray_on_slurm.sh.tmpl"
        values["dashboard_port"] = job.dashboard_port
        values["log_dir_sh"] = shlex.quote(os.path.abspath(job.log_dir))
        values["ray_gpus"] = f"--num-gpus={job.gpus_per_node}" if job.gpus_per_node else ""
    else:
        from igpt.pretrain.checkpointer import PREEMPTED_NOTE_ENV

        name = "sbatch.sh.tmpl"
        preempt = signal_name(job.preempt_signal)
        values["preempted_note_env"] = PREEMPTED_NOTE_ENV
        values["preempt_signal"] = preempt
        values["trapped_signals"] = " ".join(dict.fromkeys((preempt, "TERM")))
        values["signal_seconds"] = job.signal_seconds
        values["requeue_exit_code"] = job.requeue_exit_code
        values["procs_per_node"] = job.procs_per_node or max(job.gpus_per_node, 1)
    return render_template((TEMPLATES / name).read_text(), values)


def _write_script(script: str, log_dir: str, job_name: str) -> Path:
    """Keep the rendered script beside the logs (temp name, then rename)."""
    from igpt.data_pipeline.io import write_text_atomic

    directory = Path(log_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.sbatch.sh"
    write_text_atomic(script, path)
    return path


def _slurm(argv: list[str], env: dict[str, str] | None) -> subprocess.CompletedProcess:
    """Run a SLURM client command; a missing binary is a clear error, not a traceback."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, env=env)
    except FileNotFoundError:
        raise RuntimeError(f"{argv[0]} not found on PATH: run on a SLURM login node (or use --dry-run)") from None


def submit(job: SlurmJob, test_only: bool = False, env: dict[str, str] | None = None) -> tuple[str, Path]:
    """Render, save and submit ``job``; return (job id, or sbatch's verdict when ``test_only``; script path)."""
    script = _write_script(render_sbatch(job), job.log_dir, job.job_name)
    proc = _slurm(["sbatch", "--test-only" if test_only else "--parsable", str(script)], env)
    if proc.returncode != 0:
        reason = proc.stderr.strip() or proc.stdout.strip()
        raise RuntimeError(f"sbatch rejected {script} ({proc.returncode}): {reason}")
    return (proc.stderr.strip() if test_only else proc.stdout.strip().split(";")[0]), script


def job_info(job_id: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """``scontrol show job -o JOB`` as a dict (JobState, Reason, Restarts, ExitCode, ...)."""
    proc = _slurm(["scontrol", "show", "job", "-o", job_id], env)
    if proc.returncode != 0:
        raise RuntimeError(f"scontrol show job {job_id} failed: {proc.stderr.strip()}")
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def release_begin_time(job_id: str, env: dict[str, str] | None = None) -> bool:
    """Let a requeued job start now instead of after the credential lifetime (its BeginTime hold)."""
    return _slurm(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env).returncode == 0


def follow(job_id: str, poll: float = 2.0, release_after: float = 3.0, timeout: float | None = None,
           env: dict[str, str] | None = None, log=print) -> dict[str, str]:
    """Poll the job until it reaches a final state; return its last ``scontrol`` record.

    A requeued job pends with Reason=BeginTime for the credential lifetime (``cred_expire``,
    120 s by default); ``release_after`` seconds after it went back to pending, it is released.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    last, changed_at = None, None
    while True:
        info = job_info(job_id, env)
        state, reason, restarts = info.get("JobState"), info.get("Reason"), info.get("Restarts", "0")
        if (state, reason, restarts) != last:
            log(f"[igpt-slurm] job {job_id}: {state} (reason {reason}, restarts {restarts})")
            last = (state, reason, restarts)
            changed_at = time.monotonic()
        if state in _FINAL_STATES and not (state == "PREEMPTED" and info.get("Requeue") == "1"):
            return info
        if (state == "PENDING" and reason == "BeginTime" and restarts != "0"
                and time.monotonic() - changed_at >= release_after and release_begin_time(job_id, env)):
            log(f"[igpt-slurm] job {job_id}: released its BeginTime hold after the requeue")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout}s")
        time.sleep(poll)
