"""Screenshots of the MLflow UI for a sweep: the runs table and the chart view.

    python experiments/ui_screenshots.py                      # runs a small sweep first (the Lab 3 network
                                                             # on the real extracts, activation and l1)
    python experiments/ui_screenshots.py --store sqlite:////abs/path/mlflow.db [--experiment backdoor-prune]

Starts `mlflow ui` on 127.0.0.1 (a free port) on the store, drives headless Chromium through
Playwright (the Debian `chromium` package, `--chromium /usr/bin/chromium`; `pip install -e
".[experiments]"` for Playwright) and saves `experiments/results/mlflow_runs.png` (the runs table on
the results view that the run's footer links, the sweep's runs expanded), `experiments/results/mlflow_run.png`
(one run's page: its headline metrics) and `experiments/results/mlflow_charts.png` (the chart view). The
server is stopped whatever happens.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's `defense`, even when an installed copy lives elsewhere
RESULTS = ROOT / "experiments" / "results"
CSAW = (ROOT.parent / "shared" / "data" / "csaw").resolve()


def run_sweep(store_dir: Path) -> str:
    """A small sweep (two criteria on the Lab 3 network and the real extracts) into a fresh store."""
    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "defense.run", "-m", "model=lab3", f"model.path={CSAW / 'lab3_bd_weights.h5'}",
           "dataset=csaw_extract", f"dataset.root={CSAW}", "prune.criterion=activation,l1", "progress=false",
           f"tracking.uri={uri}", f"hydra.sweep.dir={store_dir / 'sweep'}"]
    print("running the sweep:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow ui exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"mlflow ui did not answer {url} in {seconds:.0f} s")


def experiment_id(uri: str, name: str) -> str:
    from mlflow import MlflowClient

    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    if exp is None:
        raise SystemExit(f"no experiment {name!r} in {uri}")
    return exp.experiment_id


def child_run_id(uri: str, exp_id: str) -> str:
    """The first child run of the sweep (a run with a parent), for the run page."""
    from mlflow import MlflowClient

    runs = MlflowClient(tracking_uri=uri).search_runs([exp_id], "tags.`mlflow.parentRunId` != ''",
                                                      order_by=["attributes.start_time ASC"], max_results=1)
    if not runs:
        raise SystemExit(f"no child run in experiment {exp_id} of {uri}")
    return runs[0].info.run_id


def screenshots(base: str, exp_id: str, run_id: str, chromium: str, out_dir: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    from defense.tracking.tracker import runs_table_url

    out_dir.mkdir(parents=True, exist_ok=True)
    runs_png, run_png, charts_png = out_dir / "mlflow_runs.png", out_dir / "mlflow_run.png", out_dir / "mlflow_charts.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            # the workspace switch first: switching navigates, which would leave the results view
            page.goto(f"{base}/#/experiments/{exp_id}/runs", wait_until="load")
            page.get_by_text("sweep", exact=False).first.wait_for(timeout=120_000)
            _tidy(page)
            page.goto(runs_table_url(base, exp_id), wait_until="load")
            page.get_by_text("sweep", exact=False).first.wait_for(timeout=120_000)
            # the results view (an experiment tag) applies after the table first draws: wait for it before
            # expanding the sweep, or it collapses the sweep again
            page.get_by_text("viewing a shared view", exact=False).first.wait_for(timeout=120_000)
            page.wait_for_timeout(2_000)
            _expand_sweep(page)
            page.get_by_text("prune.criterion=l1", exact=False).first.wait_for(timeout=60_000)
            page.get_by_text("test_asr", exact=True).first.wait_for(timeout=60_000)  # the results view's columns
            page.wait_for_timeout(2_000)
            page.screenshot(path=str(runs_png))
            page.goto(f"{base}/#/experiments/{exp_id}/runs/{run_id}", wait_until="load")
            page.get_by_text("test_asr", exact=True).first.wait_for(timeout=120_000)
            _tidy(page)
            page.wait_for_timeout(2_000)
            page.screenshot(path=str(run_png))
            page.goto(f"{base}/#/experiments/{exp_id}/runs?compareRunsMode=CHART", wait_until="load")
            page.get_by_text("sweep", exact=False).first.wait_for(timeout=120_000)
            page.wait_for_timeout(2_000)
            _expand_sweep(page)
            page.get_by_text("curve", exact=False).first.wait_for(timeout=120_000)  # the section of the curves
            page.wait_for_timeout(20_000)  # the charts draw after their data arrives
            page.screenshot(path=str(charts_png))
        finally:
            browser.close()
    return [runs_png, run_png, charts_png]


def _expand_sweep(page) -> None:
    """Expand the sweep's parent run so that its children (named by their overrides) show."""
    for button in page.locator("button[data-component-id*='runnamecellrenderer']").all():
        button.click(timeout=5_000)


def _tidy(page) -> None:
    """Close the assistant side panel, if open, so that the runs take the page's width; show the
    model-training navigation (the workspace switch beside GenAI)."""
    training = page.get_by_text("Model training", exact=True)
    if training.count():
        training.first.click(timeout=5_000)
        page.wait_for_timeout(500)
    close = page.locator("button[data-component-id*='assistant'][data-component-id*='close']")
    if close.count():
        close.first.click(timeout=5_000)
        page.wait_for_timeout(500)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="an MLflow tracking URI (sqlite:///<abs path>); default: run a small sweep")
    parser.add_argument("--experiment", default="backdoor-prune")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium binary (Debian: chromium)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for mlflow_runs.png and mlflow_charts.png")
    args = parser.parse_args(argv)
    if not Path(args.chromium).is_file():
        raise SystemExit(f"--chromium {args.chromium}: no such file; install Chromium (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="ui-screenshots-") as tmp:
        uri = args.store or run_sweep(Path(tmp))
        exp_id = experiment_id(uri, args.experiment)
        port = free_port()
        mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
        server = subprocess.Popen([mlflow_cli, "ui", "--backend-store-uri", uri, "-h", "127.0.0.1", "-p", str(port)],
                                  cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(f"{base}/health", server)
            for path in screenshots(base, exp_id, child_run_id(uri, exp_id), args.chromium, Path(args.out)):
                print(f"wrote {path}")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
