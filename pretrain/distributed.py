"""Rank and world size from whichever launcher started us: torchrun, the ``deepspeed`` launcher,
``srun`` (SLURM) or nothing (a plain single process).

torchrun and the deepspeed launcher export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT themselves. Under ``srun`` each task gets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID,
which ``setup_env`` maps onto the torch names; the master is the first host of the step's node
list unless MASTER_ADDR is set. A plain process becomes rank 0 of 1 on a free local port.
"""
from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Mapping, MutableMapping


LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun exports


def single_process_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: this process's) without ``LAUNCHER_VARS``: a child started with it is a plain
    single process (``detect`` gives it rank 0 of 1 on a free port), whatever launched this one."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in LAUNCHER_VARS}


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | deepspeed | env (RANK etc. set by hand) | slurm | single


def free_port() -> int:
    """A TCP port that was free a moment ago on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as ``gpu[01-03,07],login1`` into host names."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def _slurm_port(env: MutableMapping[str, str]) -> int:
    """A port every task of the job agrees on without talking: derived from the job id."""
    return 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000


def detect(env: MutableMapping[str, str] | None = None) -> DistEnv:
    """Read the distributed environment without changing it."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed" if "CROSS_RANK" in env else "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")), launcher)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or expand_nodelist(nodes)[0]
        port = int(env.get("MASTER_PORT") or _slurm_port(env))
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), int(env["SLURM_NTASKS"]),
                       addr, port, "slurm")
    return DistEnv(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()), "single")


def setup_env(env: MutableMapping[str, str] | None = None) -> DistEnv:
    """Detect the launcher and export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT."""
    env = os.environ if env is None else env
    dist_env = detect(env)
    env["RANK"], env["LOCAL_RANK"] = str(dist_env.rank), str(dist_env.local_rank)
    env["WORLD_SIZE"] = str(dist_env.world_size)
    env["MASTER_ADDR"], env["MASTER_PORT"] = dist_env.master_addr, str(dist_env.master_port)
    return dist_env


def shutdown(timeout_s: float = 60.0) -> None:
    """Tear the default process group down with rank 0 leaving last.

    Rank 0 hosts the rendezvous store; a peer still tearing down when rank 0's sockets close can
    abort (SIGABRT) instead of exiting 0. So every rank destroys its group, then checks in on the
    store, and rank 0 waits for all check-ins (up to ``timeout_s``) before it returns.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()
    dist.destroy_process_group()
    key = "igpt/shutdown"
    store.add(key, 1)
    if rank == 0:
        deadline = time.monotonic() + timeout_s
        while store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)
