"""Submit an igpt training or eval as a Ray job (the job submission API), tail it, report its end.

Training (``CONFIG.yaml [key=val …]`` or ``train …``) runs through ``igpt.cluster.ray_train`` with one
rank per Ray worker; an eval (``eval probe …``) runs as the entrypoint itself and spreads its
Ray Tune trials over the cluster it is attached to.
"""
from __future__ import annotations

import asyncio
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

import igpt
from igpt.cluster.command import igpt_args, python_igpt
from igpt.errors import UserError

# What a Ray token file holds (ours: 64 hex digits): one token of visible ASCII; read up to a bound.
_TOKEN = re.compile(r"[!-~]{1,1024}")
_TOKEN_FILE_MAX = 4096
# Never uploaded with the working dir (on top of what .gitignore excludes).
EXCLUDES = [".git", ".venv", "runs", "mlruns", "slurm-logs", "*.pt", "*.safetensors", "*.tar", "benchmarks/results"]


def default_working_dir() -> str | None:
    """The code a job runs by default: the checkout this igpt runs from, uploaded as the working dir; from a
    wheel install, None (``_run_ray`` then uploads the installed ``igpt`` package with ``py_modules``)."""
    return None if igpt.CHECKOUT is None else str(igpt.CHECKOUT)


def installed_package() -> str:
    """The directory of the installed ``igpt`` package (a wheel install's; in a checkout, CHECKOUT/igpt)."""
    return str(Path(igpt.__file__).resolve().parent)


@dataclass
class RayJob:
    """A Ray job: what to run (igpt arguments), on how many ranks, in which runtime environment."""

    command: list[str]
    address: str
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    python: str = "python"  # the interpreter on the cluster's nodes
    working_dir: str | None = field(default_factory=default_working_dir)  # uploaded; None: the cluster's igpt
    py_modules: list[str] = field(default_factory=list)  # local package dirs uploaded onto the jobs' PYTHONPATH
    env_vars: dict[str, str] = field(default_factory=dict)
    submission_id: str | None = None


def entrypoint(job: RayJob) -> str:
    """The shell command the Ray job runs on the head node."""
    args = igpt_args(job.command)
    if args[0] == "train":
        argv = [job.python, "-m", "igpt.cluster.ray_train", "--workers", str(job.workers),
                "--cpus-per-worker", str(job.cpus_per_worker), "--gpus-per-worker", str(job.gpus_per_worker),
                "--python", job.python, "--", *args]
    else:
        argv = python_igpt(job.python, args)
    return shlex.join(argv)


def runtime_env(job: RayJob) -> dict:
    """The runtime environment: the uploaded working dir (code) and the environment variables."""
    env: dict = {"env_vars": dict(job.env_vars)}
    if job.working_dir:
        if not Path(job.working_dir, "igpt").is_dir() or not Path(job.working_dir, "cluster").is_dir():
            raise UserError(f"working dir {job.working_dir} has no igpt/ and cluster/ folders; point it at the "
                            "checkout's root")
        env["working_dir"] = job.working_dir
        env["excludes"] = EXCLUDES
    if job.py_modules:
        env["py_modules"] = list(job.py_modules)
    return env


def auth_headers(token_file: str | None) -> dict[str, str]:
    """The ``Authorization`` header for a cluster with token authentication, from ``token_file`` (Ray's token
    file: the token, surrounding whitespace ignored); none without a file, where Ray's own lookup applies
    (``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``)."""
    if token_file is None:
        return {}
    with open(token_file, "rb") as f:
        raw = f.read(_TOKEN_FILE_MAX + 1)
    token = raw.decode("ascii", errors="replace").strip()
    if len(raw) > _TOKEN_FILE_MAX or not _TOKEN.fullmatch(token):
        raise UserError(f"--auth-token-file {token_file}: not a Ray token file (one token of visible ASCII "
                         "characters, as `ray get-auth-token` prints it)")
    return {"Authorization": f"Bearer {token}"}


def connect(address: str, token_file: str | None = None) -> JobSubmissionClient:
    """A job submission client of the cluster at ``address``, authenticated with ``token_file`` when given;
    no job server there, or one that wants a token and gets none or a wrong one, is a one-line error."""
    try:
        return JobSubmissionClient(address, headers=auth_headers(token_file))
    except AuthenticationError as err:
        reason = str(err).strip().splitlines()[0]
        raise UserError(f"the Ray cluster at {address} refused the request ({reason}): give its token with "
                         "--auth-token-file (a Ray cluster started by `igpt launch slurm --ray-cluster` keeps "
                         "it in LOG_DIR/NAME-JOBID.ray-token)") from None
    except ConnectionError as err:
        raise UserError(f"no Ray job server answers at {address} ({str(err).strip().splitlines()[0]})") from None


def submit(job: RayJob, client: JobSubmissionClient | None = None, agent_wait_s: float = 120.0) -> str:
    """Submit ``job``; return its submission id. A cluster whose job agent is not up yet (just started,
    or busy) answers "No available agent … try again later": the submission is retried for ``agent_wait_s``."""
    client = client or connect(job.address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint(job), runtime_env=runtime_env(job),
                                     submission_id=job.submission_id,
                                     metadata={"igpt_command": shlex.join(job.command)})
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


async def _tail(client: JobSubmissionClient, job_id: str, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out(chunk, end="", flush=True)


def wait(client: JobSubmissionClient, job_id: str, tail: bool = True, poll: float = 1.0, out=print) -> JobStatus:
    """Stream the job's logs (when ``tail``) and wait for a terminal status, which is returned."""
    if tail:
        asyncio.run(_tail(client, job_id, out))
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(poll)
