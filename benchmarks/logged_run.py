"""A benchmark's child command with its output appended to a log, failing loudly with the log's tail."""
from __future__ import annotations

import subprocess
from pathlib import Path


def run_logged(cmd: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` in ``cwd``, its output appended to ``log``; exit with the command and the log's last 40 lines
    if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{tail}")
