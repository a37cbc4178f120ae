"""Python environments for subprocesses that see the test environment's dependencies but not its ``igpt``.

The test venv has an editable install of some checkout; a user's wheel install, or a GPU machine that runs the
checkout with ``PYTHONPATH=$PWD``, has none. ``make_venv`` gives a fresh venv whose site-packages holds one
``.pth`` line naming the test venv's site-packages: a plain path line, so the ``.pth`` files inside that folder
(setuptools' ``__editable___igpt_*_finder`` among them) are not processed and ``import igpt`` fails until a wheel
is installed or a ``PYTHONPATH`` provides it. torch and the rest stay exactly as pinned in the test venv.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_SITE_PACKAGES: list[str] = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
# For a child that must find igpt through PYTHONPATH alone, as the GPU scripts arrange: neither the working
# directory (``python -m`` in the checkout) nor a script's folder goes on sys.path.
ONLY_PYTHONPATH = {"PYTHONSAFEPATH": "1"}


@dataclass(frozen=True)
class Venv:
    """A venv made by ``make_venv``."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment for a child in the venv: its bin first on PATH, no PYTHONPATH (the test run's
        would lead to a checkout), the CPU settings of scripts/test_env.sh, then ``extra``."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(VIRTUAL_ENV=str(self.root), PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                   DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
                   TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR",
                                                str(Path.home() / ".cache" / "igpt-torch-extensions")),
                   MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false", RAY_USAGE_STATS_ENABLED="0",
                   TOKENIZERS_PARALLELISM="false")
        env.update(extra)
        return env

    def run(self, args: list[str | Path], cwd: Path, timeout: float = 300, **extra_env: str
            ) -> subprocess.CompletedProcess:
        """Run ``args`` (a name in the venv's bin, or any command) in ``cwd`` with ``env(**extra_env)``; no check."""
        first = self.bin / str(args[0])
        argv = [str(first) if first.exists() else str(args[0]), *map(str, args[1:])]
        return subprocess.run(argv, cwd=cwd, env=self.env(**extra_env), capture_output=True, text=True,
                              timeout=timeout)

    def find_spec(self, module: str, cwd: Path) -> str:
        """Where the venv's interpreter finds ``module`` from ``cwd`` (its origin, or ``None``)."""
        done = self.run(["python", "-c", f"import importlib.util as u; s = u.find_spec({module!r}); "
                                         "print(s and (s.origin or list(s.submodule_search_locations)))"], cwd)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


def make_venv(root: Path, with_test_deps: bool = True) -> Venv:
    """A new venv at ``root`` (without pip of its own: the test venv's serves it) that sees the test venv's
    site-packages when ``with_test_deps``; checked to have no ``igpt`` (run from ``root``, outside any checkout)."""
    subprocess.run([sys.executable, "-m", "venv", *(["--without-pip"] if with_test_deps else []), str(root)],
                   check=True, capture_output=True, timeout=300)
    venv = Venv(root)
    if with_test_deps:
        site = subprocess.run([str(venv.python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              check=True, capture_output=True, text=True).stdout.strip()
        (Path(site) / "igpt_test_deps.pth").write_text("".join(f"{p}\n" for p in TEST_SITE_PACKAGES))
    found = venv.find_spec("igpt", cwd=root)
    assert found == "None", f"the new venv must not see an igpt (the test venv's editable install?): {found}"
    return venv


def build_wheel(out: Path) -> Path:
    """igpt's wheel, built offline with the test venv's setuptools from a copy of what pyproject.toml packages
    (the package-dir folders, pyproject.toml, the readme), so the build leaves no build/ or egg-info in the checkout."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    src = out / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", project["project"]["readme"]):
        shutil.copy2(REPO / name, src / name)
    for top in sorted({d.split("/")[0] for d in project["tool"]["setuptools"]["package-dir"].values()}):
        shutil.copytree(REPO / top, src / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("igpt-*.whl")
    return wheel
