"""The MLflow UI on the demo's store: a real `mlflow server`, its REST API, and the pages in headless Chromium.

Required under CI=true (`.ci/run` installs Chromium); skipped with the reason elsewhere when Chromium is
missing. Screenshots are kept in test-output/mlflow-ui/ at the repository root.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from browser import Browser, chromium_binary

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "test-output" / "mlflow-ui"
TRAINING_VIEW = "workflowType=machine_learning"  # the UI's "Model training" side (its default is GenAI)
ROWS = """[...document.querySelectorAll('.ag-pinned-left-cols-container [role=row][row-id]')]
  .sort((a, b) => a.getAttribute('row-index') - b.getAttribute('row-index'))
  .map(r => ({id: r.getAttribute('row-id'),
              expander: !!r.querySelector('button[data-component-id$="runnamecellrenderer.tsx_46"]')}))"""
EXPAND = """document.querySelector('[row-id="{run}"] button[data-component-id$="runnamecellrenderer.tsx_46"]').click()"""
LOSS_CHART = """(() => {
  const card = document.querySelector('h4[title="loss"]')?.closest('[data-testid="experiment-view-compare-runs-card"]');
  const line = card?.querySelector('svg.main-svg path.js-line');
  return line?.getAttribute('d') ? {points: card.querySelectorAll('svg.main-svg path.point').length,
                                    legend: card.innerText} : null; })()"""


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = chromium_binary()
    if binary is None:
        reason = "Chromium missing — run `sudo scripts/install_test_deps.sh` to check the MLflow UI in a browser"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(f"SKIPPING MLFLOW UI BROWSER TEST: {reason}")
    return binary


@pytest.fixture(scope="module")
def server(quick_demo, tmp_path_factory):
    """`mlflow server` on a free port of 127.0.0.1 over the demo's sqlite store; yields its base URL."""
    assert quick_demo.first.returncode == 0, quick_demo.first.stderr[-4000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("mlflow_server") / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{quick_demo.work / 'mlflow.db'}"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.read().strip() == b"OK":
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not come up:\n{Path(log.name).read_text()[-4000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, 15)  # the server and its worker process
    proc.wait(timeout=30)
    log.close()


def _api(url: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


@pytest.fixture(scope="module")
def store(server) -> dict:
    """The demo's experiment and runs as the server reports them over HTTP."""
    exp = _api(server, "experiments/get-by-name", experiment_name="igpt-demo")["experiment"]
    runs = _api(server, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000})["runs"]
    for r in runs:
        r["tags"] = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
        r["metrics"] = {m["key"] for m in r["data"].get("metrics", [])}
    return {"experiment": exp, "runs": runs}


@pytest.mark.slow
def test_server_serves_the_training_run_its_loss_history_and_sample_grid(server, store):
    exp = store["experiment"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in exp["tags"]
    (train,) = [r for r in store["runs"] if "loss" in r["metrics"]]
    run_id = train["info"]["run_id"]
    history = _api(server, "metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
    assert [m["step"] for m in history] == [3, 6, 9, 12] and all(0 < m["value"] < 7 for m in history)
    files = _api(server, "artifacts/list", run_id=run_id, path="samples")["files"]
    grid = next(f["path"] for f in files if f["path"].endswith(".png"))
    with urllib.request.urlopen(f"{server}/get-artifact?{urllib.parse.urlencode({'path': grid, 'run_uuid': run_id})}",
                                timeout=30) as resp:
        assert resp.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_browser_shows_the_loss_chart_and_trials_nested_under_their_eval(chromium, server, store, tmp_path):
    exp_id = store["experiment"]["experiment_id"]
    runs = store["runs"]
    (train,) = [r["info"]["run_id"] for r in runs if "loss" in r["metrics"]]
    parents = {r["info"]["run_id"] for r in runs if "mlflow.parentRunId" not in r["tags"]}
    (probe,) = [r["info"]["run_id"] for r in runs if r["info"]["run_name"] == "probe"]
    trials = {r["info"]["run_id"] for r in runs if r["tags"].get("mlflow.parentRunId") == probe}
    # model, raw-pixel and random-init probes: the initial grid's 2 L2 values each, plus those it widened to
    assert len(trials) >= 6 and len(parents) == 4
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with Browser(tmp_path / "chromium") as page:
        page.goto(f"{server}/#/experiments/{exp_id}/runs/{train}/model-metrics?{TRAINING_VIEW}")
        chart = page.wait_for(LOSS_CHART)
        assert chart["points"] >= 4 and "(loss)" in chart["legend"]
        page.screenshot(SCREENSHOTS / "run-model-metrics.png")

        page.goto(f"{server}/#/experiments/{exp_id}/runs?{TRAINING_VIEW}")
        rows = page.wait_for(f"(() => {{ const r = {ROWS}; return r.length ? r : null; }})()")
        assert {r["id"] for r in rows} == parents  # trials are not listed at the top level
        assert [r["id"] for r in rows if r["expander"]] == [probe]
        page.evaluate(EXPAND.format(run=probe))
        rows = page.wait_for(f"(() => {{ const r = {ROWS}; return r.length > {len(parents)} ? r : null; }})()")
        ids = [r["id"] for r in rows]
        assert set(ids[ids.index(probe) + 1:ids.index(probe) + 1 + len(trials)]) == trials  # right under probe
        page.screenshot(SCREENSHOTS / "runs-trials-expanded.png")
    print(f"screenshots: {SCREENSHOTS}")
