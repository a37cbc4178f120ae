"""igpt's wheel as a user gets it: built offline from the checkout and installed without dependencies into a fresh
venv that sees the test venv's packages (torch as pinned) but not its editable igpt (tests/isolated_venv.py); then,
from a folder outside the checkout, the ``igpt`` console script runs palette → 8x8 shards → 2 training steps with
the Triton kernel (interpreter) → export → eval nll. Also: the package data the install carries, and that ``igpt``
is the wheel's only top-level package. ``IGPT_TEST_NETWORK=1`` adds a full install from the package index."""
from __future__ import annotations

import json
import os
import re
import tomllib
import zipfile
from pathlib import Path

import pytest
from isolated_venv import REPO, TEST_SITE_PACKAGES, Venv, build_wheel, make_venv

pytestmark = pytest.mark.slow

PACKAGE_DIRS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
# What the installed package holds, read back with importlib.resources in the venv.
RESOURCES = """
import json, igpt
from importlib.resources import files
print(json.dumps({
    "igpt": igpt.__file__, "checkout": igpt.CHECKOUT and str(igpt.CHECKOUT),
    "configs": sorted(p.name for p in files("igpt.configs").iterdir() if p.name.endswith(".yaml")),
    "demo_config": files("igpt.configs").joinpath("cifar10-demo.yaml").read_text(),
    "templates": sorted(p.name for p in files("igpt.cluster.templates").iterdir() if p.name.endswith(".tmpl")),
    "attention_table": json.loads(files("igpt.pretrain").joinpath("attention_table.json").read_text()),
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """The venv with the wheel installed (``--ignore-installed``: pip sees the test venv's editable igpt through
    the .pth and would call the wheel already installed)."""
    venv = make_venv(tmp_path_factory.mktemp("venv") / "venv")
    done = venv.run(["python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel],
                    cwd=venv.root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (venv.bin / "igpt").is_file()
    return venv


def test_the_wheel_holds_igpt_only_and_every_module(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"igpt"}
    for package, folder in PACKAGE_DIRS.items():
        for module in (REPO / folder).glob("*.py"):
            assert f"{package.replace('.', '/')}/{module.name}" in names, f"{folder}/{module.name} is not in the wheel"


def test_the_install_carries_configs_templates_and_the_attention_table(installed: Venv) -> None:
    done = installed.run(["python", "-c", RESOURCES], cwd=installed.root)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert Path(found["igpt"]).is_relative_to(installed.root) and found["checkout"] is None
    assert found["configs"] == sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert "cifar10-demo.yaml" in found["configs"]
    assert found["demo_config"] == (REPO / "configs" / "cifar10-demo.yaml").read_text()
    assert found["templates"] == sorted(p.name for p in (REPO / "cluster" / "templates").glob("*.tmpl"))
    assert found["attention_table"] == json.loads((REPO / "pretrain" / "attention_table.json").read_text())


def test_the_console_script_runs_the_pipeline_outside_the_checkout(installed: Venv, cifar_dir: Path,
                                                                   tmp_path: Path) -> None:
    def igpt(*args: str | Path, **env: str) -> str:
        done = installed.run(["igpt", *args], cwd=tmp_path, timeout=600, **env)
        assert done.returncode == 0, f"igpt {args[0]}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    assert not tmp_path.resolve().is_relative_to(REPO)
    assert "palette → shards → train → eval → launch" in igpt("--help")
    hf = installed.run(["python", "-c", "import kernels; print(kernels.__file__)"], cwd=tmp_path)
    assert hf.returncode == 0, hf.stderr
    assert any(Path(hf.stdout.strip()).is_relative_to(site) for site in TEST_SITE_PACKAGES), hf.stdout  # Hugging Face's

    igpt("palette", "fit", "--kind", "uniform9", "--out", "palette.npy")
    igpt("data", "shard", cifar_dir / "cifar10-train-000000.tar", "--out", "tokens", "--palette", "palette.npy",
         "--resolution", "8", "--val-fraction", "0.1", "--shard-size", "100", "--limit", "300", "--workers", "1")
    log = igpt("train", REPO / "configs" / "cifar10-cpu-tiny.yaml", "data.dir=tokens", "train.run_dir=run",
               "train.steps=2", "model.attn_backend=triton", "logging.backend=jsonl", "model.n_layer=1",
               "train.micro_batch_size=2", "train.log_every=1", "train.val_every=2", "train.val_batches=1",
               "checkpoint.every=2", TRITON_INTERPRET="1", PYTHONPROFILEIMPORTTIME="1")
    # The Triton backend imports the kernel lazily in its forward, which raises off CUDA without the interpreter.
    assert re.search(r"\|\s+igpt\.kernels\.flash_attention$", log, re.MULTILINE), log[-3000:]
    losses = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert [row["step"] for row in losses] == [1, 2]

    igpt("export", "run", "--out", "release")
    igpt("eval", "nll", "--checkpoint", "release", "--data", "tokens", "--limit", "8", "--out", "eval")
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["images"] == 8 and 0 < summary["nats_per_token"] < 7


@pytest.mark.skipif(os.environ.get("IGPT_TEST_NETWORK") != "1",
                    reason="a full install from the package index needs the network: IGPT_TEST_NETWORK=1")
@pytest.mark.timeout(3600)
def test_a_full_install_from_the_index(wheel: Path, tmp_path: Path) -> None:
    venv = make_venv(tmp_path / "venv", with_test_deps=False)
    done = venv.run(["python", "-m", "pip", "install", "-q", "--constraint", REPO / "constraints.txt", wheel],
                    cwd=tmp_path, timeout=3000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert venv.run(["igpt", "--help"], cwd=tmp_path).returncode == 0
    done = venv.run(["python", "-c", "import igpt.pretrain.train, igpt.evals.commands, igpt.cluster.ray_job"],
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
