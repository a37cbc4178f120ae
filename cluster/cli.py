"""`igpt launch slurm …` and `igpt launch ray …`: the same igpt commands as cluster jobs.

    igpt launch slurm configs/x.yaml train.steps=1000 --nodes 4 --gpus-per-node 8 --partition gpu
    igpt launch slurm --ray-cluster --nodes 3 -- eval probe --checkpoint runs/x --data shards/
    igpt launch ray configs/x.yaml --address http://HEAD:8265 --workers 8 --gpus-per-worker 1
    igpt launch ray --address http://HEAD:8265 -- eval probe --checkpoint runs/x --data shards/
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from igpt.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `launch slurm` and `launch ray` to the igpt command line."""
    launch = subparsers.add_parser("launch", help="run igpt train / eval as a SLURM or Ray job")
    sub = launch.add_subparsers(dest="launcher", metavar="LAUNCHER", required=True)
    _add_slurm(sub)
    _add_ray(sub)


def _add_slurm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slurm", help="render an sbatch script (torchrun on every node) and submit it",
                       description="Train on N nodes: one task per node runs torchrun with a c10d rendezvous on "
                                   "the first node. The config's checkpoint.preempt_signal (default USR1, sent "
                                   "when the time limit is near) or TERM (preemption) makes the training "
                                   "checkpoint; once that checkpoint is complete the job requeues itself and resumes with --resume auto.")
    p.add_argument("command", nargs="*", help="CONFIG.yaml [key=value …], or after -- an igpt subcommand")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU training")
    p.add_argument("--procs-per-node", type=int, default=None, help="ranks per node (default: GPUs per node, or 1)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="CPUs per node (one task per node)")
    p.add_argument("--mem", default=None, help="memory per node, e.g. 256G")
    p.add_argument("--time", default="04:00:00", help="time limit, e.g. 1-00:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--job-name", default="igpt")
    p.add_argument("--log-dir", default="slurm-logs", help="job logs and the rendered script (shared filesystem)")
    p.add_argument("--setup", default="", help="shell lines run first on the batch host (module load, venv …)")
    p.add_argument("--setup-file", type=Path, default=None, help="a file whose lines are the set-up hook")
    p.add_argument("--python", default=sys.executable, help="interpreter on the nodes (default: this one)")
    p.add_argument("--signal-seconds", type=int, default=90,
                   help="send the config's checkpoint.preempt_signal (default USR1) this long before the time limit")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra #SBATCH option (repeatable)")
    p.add_argument("--srun-arg", action="append", default=[], help="extra srun option, e.g. --container-image=…")
    p.add_argument("--ray-cluster", action="store_true",
                   help="start a Ray cluster in the allocation; the command (e.g. eval …) is its driver")
    p.add_argument("--dashboard-port", type=int, default=8265)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    mode.add_argument("--test-only", action="store_true", help="ask `sbatch --test-only` whether it would run")
    p.add_argument("--follow", action="store_true",
                   help="stay until the job ends, releasing the BeginTime hold after each requeue")
    p.set_defaults(func=_run_slurm)


def _add_ray(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ray", help="submit a training (one rank per worker) or an eval as a Ray job",
                       description="Submit through Ray's job submission API, tail the logs, report the status.")
    p.add_argument("command", nargs="+", help="CONFIG.yaml [key=value …], or after -- an igpt subcommand")
    p.add_argument("--address", required=True, help="the Ray dashboard / job server, http://HEAD:8265")
    p.add_argument("--workers", type=int, default=1, help="training ranks, one per Ray worker")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--python", default="python", help="interpreter on the cluster's nodes")
    p.add_argument("--working-dir", default=None,
                   help="code uploaded with the job (default: this checkout; from a wheel install, the installed igpt "
                        "package as a py_module); 'none': use what is installed on the cluster")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable (repeatable)")
    p.add_argument("--auth-token-file", default=os.environ.get("RAY_AUTH_TOKEN_PATH"), metavar="PATH",
                   help="the cluster's token, for token authentication (default: $RAY_AUTH_TOKEN_PATH); the Ray "
                        "cluster of `igpt launch slurm --ray-cluster` writes it to LOG_DIR/NAME-JOBID.ray-token")
    p.add_argument("--submission-id", default=None)
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.set_defaults(func=_run_ray)


def _checked(command: list[str], launcher: str, resume: str | None = "auto") -> tuple[list[str], dict | None]:
    """``igpt_args`` of ``command``, validated here first, and its training config (None for eval/export);
    warnings for paths not seen here."""
    from igpt.cluster.command import check_command, igpt_args

    argv = igpt_args(command, resume=resume)
    checked = check_command(argv)
    for warning in checked.warnings:
        print(f"igpt launch {launcher}: warning: {warning}", file=sys.stderr, flush=True)
    return argv, checked.config


def _run_slurm(args: argparse.Namespace) -> int:
    from igpt.cluster.command import python_igpt
    from igpt.cluster.slurm import SlurmJob, follow, render_sbatch, submit

    setup = args.setup
    if args.setup_file is not None:
        setup = args.setup_file.read_text() + "\n" + setup
    preempt_signal = SlurmJob.preempt_signal
    if args.ray_cluster:
        command = python_igpt(args.python, _checked(args.command, "slurm", resume=None)[0]) if args.command else []
    else:
        argv, cfg = _checked(args.command, "slurm")
        command = python_igpt(args.python, argv)
        if cfg is not None:
            preempt_signal = cfg.checkpoint.preempt_signal
    job = SlurmJob(command=command, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                   procs_per_node=args.procs_per_node, cpus_per_task=args.cpus_per_task, mem=args.mem,
                   time=args.time, partition=args.partition, account=args.account, job_name=args.job_name,
                   log_dir=args.log_dir, setup=setup, python=args.python, preempt_signal=preempt_signal,
                   signal_seconds=args.signal_seconds, sbatch_args=args.sbatch_arg, srun_args=args.srun_arg,
                   ray_cluster=args.ray_cluster, dashboard_port=args.dashboard_port)
    if args.dry_run:
        print(render_sbatch(job), end="")
        return 0
    job_id, script = submit(job, test_only=args.test_only)
    if args.test_only:
        print(f"{script}: {job_id}")
        return 0
    print(job_id, flush=True)
    print(f"[igpt-slurm] submitted {script}; log {Path(args.log_dir).resolve()}/{args.job_name}-{job_id}.out",
          file=sys.stderr, flush=True)
    if not args.follow:
        return 0
    info = follow(job_id, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return 0 if info.get("JobState") == "COMPLETED" else 1


def _run_ray(args: argparse.Namespace) -> int:
    from ray.job_submission import JobStatus

    from igpt.cluster.ray_job import RayJob, connect, default_working_dir, installed_package, submit, wait

    env_vars = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r}: expected KEY=VALUE")
        env_vars[key] = value
    _checked(args.command, "ray")
    working_dir = None if args.working_dir == "none" else (args.working_dir or default_working_dir())
    # From a wheel install (no checkout to upload) the jobs run the installed igpt package, uploaded.
    py_modules = [installed_package()] if args.working_dir is None and working_dir is None else []
    job = RayJob(py_modules=py_modules, command=args.command, address=args.address, workers=args.workers,
                 cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker, python=args.python,
                 working_dir=working_dir, env_vars=env_vars, submission_id=args.submission_id)
    client = connect(args.address, args.auth_token_file)
    job_id = submit(job, client)
    print(job_id, flush=True)
    if args.no_wait:
        return 0
    status = wait(client, job_id)
    print(f"[igpt-ray] job {job_id}: {status.value}", file=sys.stderr, flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
