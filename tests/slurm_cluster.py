"""A real single-host SLURM cluster for tests: munged + slurmctld + one slurmd per node.

Everything lives under one temporary directory (munge key and socket, slurm.conf, state,
spool, logs), listens on 127.0.0.1 only, and is stopped by the PIDs this module started.
Debian's `slurm-wlm` is built with multiple-slurmd support, so `NodeName=node[1-N]
NodeHostname=localhost Port=[a-b]` with one `slurmd -N nodeI` each gives an N-node cluster.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun", "sinfo")


def missing_slurm_binaries() -> list[str]:
    """Names of the SLURM/munge programs that are not on PATH (or in /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return [b for b in SLURM_BINARIES if shutil.which(b, path=path) is None]


def _free_port_range(count: int, lo: int = 20000, hi: int = 40000) -> int:
    """The first port of `count` consecutive free TCP ports on 127.0.0.1."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        base = rng.randrange(lo, hi - count)
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports in [{lo}, {hi})")


def _sbin(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise FileNotFoundError(f"{name} not found; run scripts/install_test_deps.sh")
    return found


@dataclass
class SlurmCluster:
    """A running test cluster; `env` points SLURM clients at it (SLURM_CONF)."""

    root: Path
    conf: Path
    nodes: list[str]
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def cmd(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, NodeList, BatchHost, ...)."""
        out = self.cmd("scontrol", "show", "job", "-o", job_id).stdout.strip()
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def logs(self, tail: int = 40) -> str:
        """The tails of the daemons' logs, for failure messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons it started, by PID (slurmd first, munged last)."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            jobs = self.cmd("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.cmd("scancel", *jobs, check=False)
                deadline = time.monotonic() + 30
                while self.cmd("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                    time.sleep(0.5)
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


SLURM_CONF = """\
ClusterName=igpttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire={cred_expire}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=3600
InactiveLimit=0
SlurmdTimeout=60
NodeName={node_prefix}[1-{n}] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{node_port}-{node_port_end}] CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes={node_prefix}[1-{n}] Default=YES MaxTime=INFINITE State=UP
"""


def start_slurm_cluster(root: Path, num_nodes: int = 2, cpus: int = 2, cred_expire: int = 120,
                        timeout: float = 60) -> SlurmCluster:
    """Start munged, slurmctld and `num_nodes` slurmd under `root`; wait until all nodes are idle."""
    root = Path(root)
    for d in ("munge", "state", "log", "spool"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = root / "munge" / "munge.socket"
    base = _free_port_range(num_nodes + 1)
    nodes = [f"node{i}" for i in range(1, num_nodes + 1)]
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(
        host=socket.gethostname().split(".")[0], ctld_port=base, user=_user_name(),
        munge_socket=munge_socket, cred_expire=cred_expire, root=root, node_prefix="node",
        n=num_nodes, node_port=base + 1, node_port_end=base + num_nodes, cpus=cpus))
    env = dict(os.environ, SLURM_CONF=str(conf))
    env.pop("SLURM_JOB_ID", None)
    cluster = SlurmCluster(root=root, conf=conf, nodes=nodes, env=env)
    log = open(root / "log" / "daemons.out", "ab")
    try:
        cluster.procs["munged"] = subprocess.Popen(
            [_sbin("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
             f"--pid-file={root / 'munge' / 'munged.pid'}", f"--seed-file={root / 'munge' / 'munged.seed'}",
             f"--log-file={root / 'log' / 'munged.log'}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(lambda: munge_socket.exists(), 10, "munged socket", cluster)
        cluster.procs["slurmctld"] = subprocess.Popen(
            [_sbin("slurmctld"), "-D", "-i", "-f", str(conf)], env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(lambda: cluster.cmd("scontrol", "ping", check=False).stdout.count("UP") > 0,
                  timeout, "slurmctld to answer", cluster)
        for node in nodes:
            (root / "spool" / node).mkdir(exist_ok=True)
            cluster.procs[f"slurmd-{node}"] = subprocess.Popen(
                [_sbin("slurmd"), "-D", "-N", node, "-f", str(conf)], env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(lambda: _all_idle(cluster), timeout, "nodes to become idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    finally:
        log.close()
    return cluster


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _all_idle(cluster: SlurmCluster) -> bool:
    out = cluster.cmd("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
    states = dict(line.split() for line in out if line.strip())
    return all(states.get(n) == "idle" for n in cluster.nodes)


def _wait_for(pred, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n"
                                   f"{(cluster.root / 'log' / 'daemons.out').read_text(errors='replace')}\n"
                                   f"{cluster.logs()}")
        if pred():
            return
        time.sleep(0.3)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{cluster.logs()}")
