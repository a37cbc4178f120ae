"""`igpt launch ray` against a real local Ray head (job server from ray[default]), started and stopped here."""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from igpt.cluster.cli import register
from igpt.cluster.ray_job import RayJob, auth_headers, connect, entrypoint, runtime_env
from igpt.cluster.ray_train import rank_envs

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` in its own process group, dashboard on 127.0.0.1; stopped by its PID.
    Yields (job server address, token file).

    Its own --temp-dir keeps other tests' `ray.init()` from finding it (never `ray stop`). Token
    authentication is on, as `igpt launch slurm --ray-cluster` starts a head: RAY_AUTH_MODE=token with
    the token in a private file (RAY_AUTH_TOKEN_PATH), never a shared ~/.ray/auth_token, which other
    Ray users of this host may rewrite while the cluster runs. This process keeps RAY_AUTH_MODE=disabled
    (conftest): only `igpt launch ray --auth-token-file` authenticates it."""
    token = tmp_path_factory.mktemp("ray-token") / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    temp_dir = tempfile.mkdtemp(prefix="igr", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dash_port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = open(Path(temp_dir) / "head.out", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--port", str(_free_port()),
         "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
         "--num-cpus", "4", "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}: {(Path(temp_dir) / 'head.out').read_text()}")
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                raise AssertionError(f"the job server at {address} answered a request without the token")
            except urllib.error.HTTPError as err:  # up, and asking for the token
                assert err.code == 401, err
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Ray job server not up at {address}:\n"
                                       f"{(Path(temp_dir) / 'head.out').read_text()[-3000:]}")
                time.sleep(1)
        yield address, str(token)
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own group: only what it started
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _launch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="igpt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["launch", "ray", *argv])
    return args.func(args)


def test_entrypoint_and_runtime_env():
    job = RayJob(command=["configs/x.yaml", "train.steps=5"], address="http://h:8265", workers=4,
                 gpus_per_worker=1, python="python3")
    ep = entrypoint(job)
    assert ep.startswith("python3 -m igpt.cluster.ray_train --workers 4")
    assert ep.endswith("-- train configs/x.yaml train.steps=5 --resume auto")
    env = runtime_env(job)
    assert env["working_dir"] == str(REPO) and ".venv" in env["excludes"]
    ev = entrypoint(RayJob(command=["eval", "probe", "--checkpoint", "r"], address="x", python="python3"))
    assert "igpt.cluster.ray_train" not in ev and ev.endswith("eval probe --checkpoint r")
    with pytest.raises(ValueError, match="neither a CONFIG.yaml"):
        entrypoint(RayJob(command=["probe"], address="x"))


def test_wheel_install_uploads_the_installed_package():
    """From a wheel install (no checkout) a job gets the installed igpt package as a py_module, no working dir."""
    from igpt.cluster.ray_job import installed_package

    assert installed_package() == str(REPO / "igpt")  # in a checkout, its igpt/ folder
    env = runtime_env(RayJob(command=["c.yaml"], address="x", working_dir=None, py_modules=[installed_package()]))
    assert env["py_modules"] == [str(REPO / "igpt")] and "working_dir" not in env
    with pytest.raises(ValueError, match="no igpt/ and cluster/ folders"):
        runtime_env(RayJob(command=["c.yaml"], address="x", working_dir=str(REPO / "configs")))


def test_rank_envs_group_ranks_by_node_and_gpus():
    places = [{"node_id": "b", "ip": "10.0.0.2", "gpu_ids": ["1"], "free_port": 1},
              {"node_id": "a", "ip": "10.0.0.1", "gpu_ids": ["0"], "free_port": 2},
              {"node_id": "b", "ip": "10.0.0.2", "gpu_ids": ["0"], "free_port": 3}]
    envs = rank_envs(places)
    assert [e["RANK"] for e in envs] == ["0", "2", "1"]
    assert all(e["MASTER_ADDR"] == "10.0.0.2" and e["MASTER_PORT"] == "1" and e["WORLD_SIZE"] == "3" for e in envs)
    assert [e["LOCAL_RANK"] for e in envs] == ["1", "0", "0"]  # the index of the rank's GPU on its node
    assert envs[0]["CUDA_VISIBLE_DEVICES"] == "0,1" and envs[1]["CUDA_VISIBLE_DEVICES"] == "0"
    assert [e["LOCAL_WORLD_SIZE"] for e in envs] == ["2", "1", "2"]


CPU_ENV = [arg for key in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING",
                           "TORCH_EXTENSIONS_DIR") if key in os.environ
           for arg in ("--env", f"{key}={os.environ[key]}")]


@pytest.mark.slow
def test_ray_job_trains_on_two_workers_then_probes(ray_head, cifar_tokens, tmp_path, capsys):
    """A 2-rank training (one rank per Ray worker) and a Ray Tune probe eval, both as Ray jobs, both in MLflow."""
    from mlflow.tracking import MlflowClient

    run_dir, store = tmp_path / "run", f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    address, token = ray_head
    common = ["--address", address, "--auth-token-file", token, "--python", sys.executable, *CPU_ENV]
    rc = _launch([str(REPO / "configs" / "cifar10-cpu-tiny.yaml"), f"data.dir={cifar_tokens}",
                  f"train.run_dir={run_dir}", "train.steps=12", "train.log_every=4", "train.val_every=12",
                  "train.sample_every=1000", "checkpoint.every=12", "--workers", "2", *common])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert "[igpt-ray] 2 ranks" in out.out and "rank exit codes: [0, 0]" in out.out
    assert (run_dir / "checkpoints" / "step_00000012" / "COMPLETE.json").is_file()

    rc = _launch([*common, "--", "eval", "probe", "--checkpoint", str(run_dir), "--data", str(cifar_tokens),
                  "--out", str(tmp_path / "probe"), "--device", "cpu", "--limit", "200", "--layers", "mid",
                  "--tracking-uri", store, "--set", "probe.l2=[0.01]", "--set", "probe.max_iter=50"])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err

    client = MlflowClient(store)
    train_run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert train_run.info.status == "FINISHED" and "loss" in train_run.data.metrics
    assert train_run.data.params.get("train.steps") == "12"
    probe_exp = client.get_experiment_by_name("igpt-eval")
    probe_runs = client.search_runs([probe_exp.experiment_id])
    assert probe_runs and all(r.info.status == "FINISHED" for r in probe_runs)
    assert any(r.data.metrics for r in probe_runs)


def test_auth_token_file_is_read_bounded_and_checked(tmp_path):
    """A token file gives an Authorization header; anything else in it is a one-line error, read up to a bound."""
    token = tmp_path / "token"
    token.write_text("ab" * 32 + "\n")
    assert auth_headers(str(token)) == {"Authorization": "Bearer " + "ab" * 32} and auth_headers(None) == {}
    for bad in (b"", b"two words", b"ab\r\nX-Injected: 1", b"\xff\xfe", b"a" * 100_000_000):
        token.write_bytes(bad)
        with pytest.raises(ValueError, match="--auth-token-file .*: not a Ray token file") as err:
            auth_headers(str(token))
        assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError):
        auth_headers(str(tmp_path / "missing"))


@pytest.mark.slow
def test_token_auth_cluster_refuses_submissions_without_its_token(ray_head, tmp_path, capsys, monkeypatch):
    """The head has token authentication (as `igpt launch slurm --ray-cluster` starts it): `igpt launch ray`
    without its token, with a wrong one or at no job server at all is refused in one line."""
    from igpt.runner import add_common_options, run

    address, token = ray_head
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)  # the default of --auth-token-file
    wrong = tmp_path / "wrong"
    wrong.write_text("cd" * 32)
    for extra, reason in (([], "Authentication required"), (["--auth-token-file", str(wrong)], "Authentication failed"),
                          (["--address", f"http://127.0.0.1:{_free_port()}"], "no Ray job server")):
        parser = argparse.ArgumentParser(prog="igpt")
        register(parser.add_subparsers(dest="command", required=True))
        args = add_common_options(parser).parse_args(
            ["launch", "ray", "--address", address, *extra, "--no-wait", "--", "eval", "probe",
             "--checkpoint", str(tmp_path), "--data", str(tmp_path)])
        assert run(args) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1 and reason in err, err
    assert isinstance(connect(address, token).list_jobs(), list)  # the right token gets in
