"""Multi-rank training on a Ray cluster: one rank per Ray worker, each with a torch rank environment.

Run as a Ray job's entrypoint (``igpt launch ray`` builds it):
``python -m igpt.cluster.ray_train --workers 4 --gpus-per-worker 1 -- train CONFIG.yaml key=val …``.
It places one ``RankWorker`` actor per rank (a placement group spread over the nodes), gives
each RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT (and
CUDA_VISIBLE_DEVICES covering its node's ranks, as torchrun would), and runs the igpt command
in a subprocess of each actor, so the training owns its main thread and signal handlers
exactly as under torchrun. The driver exits with the first non-zero rank exit code.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
from collections import defaultdict

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from igpt.cluster.command import igpt_args, python_igpt
from igpt.errors import UserError


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the actor process dies (Linux), so no rank is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@ray.remote
class RankWorker:
    """One training rank: reports where it runs, then runs the command with its rank environment."""

    def where(self) -> dict:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "free_port": port}

    def run(self, argv: list[str], env: dict[str, str]) -> int:
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, preexec_fn=_die_with_parent)
        for line in proc.stdout:
            print(f"[rank {env['RANK']}] {line}", end="", flush=True)
        return proc.wait()


def rank_envs(places: list[dict]) -> list[dict[str, str]]:
    """The torch rank environment of each worker, in worker order, from where each one runs.

    Ranks are grouped by node (the node of worker 0 first) so that LOCAL_RANK counts within a node;
    with GPUs every rank of a node sees all of that node's assigned GPUs and LOCAL_RANK indexes them.
    """
    by_node: dict[str, list[int]] = defaultdict(list)
    for i, place in enumerate(places):
        by_node[place["node_id"]].append(i)
    order = [i for members in by_node.values() for i in members]
    master = places[order[0]]
    envs: list[dict[str, str]] = [{} for _ in places]
    for members in by_node.values():
        gpus = sorted({g for i in members for g in places[i]["gpu_ids"]}, key=lambda g: (len(g), g))
        for local_rank, i in enumerate(members):
            env = {"RANK": str(order.index(i)), "WORLD_SIZE": str(len(places)),
                   "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(len(members)),
                   "MASTER_ADDR": master["ip"], "MASTER_PORT": str(master["free_port"])}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
                env["LOCAL_RANK"] = str(gpus.index(places[i]["gpu_ids"][0]))
            envs[i] = env
    return envs


def run(args: list[str], workers: int, cpus_per_worker: float, gpus_per_worker: float, python: str,
        strategy: str = "SPREAD") -> int:
    """Run ``igpt ARGS`` as ``workers`` ranks on the connected Ray cluster; return the exit code."""
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    bundle = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    pg = placement_group([bundle] * workers, strategy=strategy)
    ray.get(pg.ready(), timeout=600)
    try:
        actors = [RankWorker.options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                     scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote()
                  for i in range(workers)]
        envs = rank_envs(ray.get([a.where.remote() for a in actors]))
        argv = python_igpt(python, args)
        print(f"[igpt-ray] {workers} ranks, master {envs[0]['MASTER_ADDR']}:{envs[0]['MASTER_PORT']}: "
              f"igpt {' '.join(args)}", flush=True)
        codes = ray.get([a.run.remote(argv, env) for a, env in zip(actors, envs)])
    finally:
        remove_placement_group(pg)
    print(f"[igpt-ray] rank exit codes: {codes}", flush=True)
    return next((c for c in codes if c != 0), 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m igpt.cluster.ray_train", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--strategy", default="SPREAD", choices=["SPREAD", "STRICT_SPREAD", "PACK"])
    parser.add_argument("--python", default=sys.executable, help="interpreter the ranks run (default: this one)")
    parser.add_argument("command", nargs="+", help="igpt arguments: CONFIG.yaml [key=val …] or train …")
    ns = parser.parse_args(argv)
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level="WARNING")
    return run(igpt_args(ns.command), ns.workers, ns.cpus_per_worker, ns.gpus_per_worker, ns.python, ns.strategy)


if __name__ == "__main__":
    sys.exit(main())
