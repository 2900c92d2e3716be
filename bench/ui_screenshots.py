"""What users see in the Prefect UI, as they see it: a real server, the demo run against it, headless Chromium.

    .venv/bin/python bench/ui_screenshots.py --out data/ui [--workdir data/ui/demo] [--port 4311]

Starts ``prefect server start`` with its own PREFECT_HOME under ``--out`` (the user's database is not touched),
runs ``aspire demo`` against it (cached stages are reused on a second call), finds the flow run and its artifacts
through the API, and takes screenshots with Chromium (``apt-get install -y chromium``):

- ``run.png``        the flow run page: the run graph (one box per stage subflow) and its logs
- ``artifacts.png``  the run's artifacts tab (config, stage tables, progress, report)
- ``artifact-list.png`` the Artifacts page: keys in stage order
- ``report.png``     the report artifact (tables, the per-group chart and the edit grid as inline images)
- ``stage-table.png`` one stage's summary table (holdout, with its nested ``before`` block)
- ``stage.png``      one stage subflow (remove) with its shard tasks
- ``logs.png``       the logs of the classifier stage (epoch loss and accuracy)

Look at them: a screenshot is only evidence once someone has. Prints the files and what the API says (subflow
names in order, artifact keys).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def wait_for(url: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the Prefect server did not answer at {url} within {seconds:.0f} s")


def screenshot(chromium: str, url: str, path: Path, height: int = 1400) -> None:
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1600,{height}", "--virtual-time-budget=30000", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"{path}  <- {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "ui")
    parser.add_argument("--workdir", type=Path, default=None, help="demo workdir (default: <out>/demo)")
    parser.add_argument("--port", type=int, default=4311)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("no Chromium found: apt-get install -y chromium")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    api = f"http://127.0.0.1:{args.port}/api"
    env = {**os.environ, "PREFECT_HOME": str(out / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": api}
    server = subprocess.Popen([str(REPO / ".venv" / "bin" / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(args.port)], env=env, stdout=open(out / "server.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(f"{api}/health")
        workdir = (args.workdir or out / "demo").resolve()
        subprocess.run([str(REPO / ".venv" / "bin" / "aspire"), "demo", "--workdir", str(workdir)], env=env,
                       check=True, cwd=REPO)
        client = httpx.Client(base_url=api, timeout=30)
        runs = client.post("/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 50}).json()
        parent = next(r for r in runs if r["parent_task_run_id"] is None and r["name"].startswith("demo"))
        children = client.post("/flow_runs/filter", json={
            "flow_runs": {"parent_flow_run_id": {"operator": "and_", "any_": [parent["id"]]}},
            "sort": "START_TIME_ASC", "limit": 50}).json()
        print("flow run:", parent["name"], parent["state_type"], parent["tags"])
        print("stage subflows:", " -> ".join(f"{c['name']} ({c['state_type'].lower()})" for c in children))
        artifacts = client.post("/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [parent["id"], *(c["id"] for c in children)]}}, "limit": 200}).json()
        print("artifacts:", sorted({a["key"] for a in artifacts if a.get("key")}))
        ui = f"http://127.0.0.1:{args.port}"
        screenshot(chromium, f"{ui}/runs/flow-run/{parent['id']}", out / "run.png")
        screenshot(chromium, f"{ui}/runs/flow-run/{parent['id']}?tab=Artifacts", out / "artifacts.png")
        screenshot(chromium, f"{ui}/artifacts", out / "artifact-list.png")
        report = next(a for a in artifacts if (a.get("key") or "").endswith("-report"))
        screenshot(chromium, f"{ui}/artifacts/artifact/{report['id']}", out / "report.png", height=5200)
        holdout = next(a for a in artifacts if (a.get("key") or "").endswith("-stage-03-holdout"))
        screenshot(chromium, f"{ui}/artifacts/artifact/{holdout['id']}", out / "stage-table.png")
        by_name = {c["name"]: c for c in children}
        if "remove" in by_name:
            screenshot(chromium, f"{ui}/runs/flow-run/{by_name['remove']['id']}", out / "stage.png")
        if "classifier" in by_name:
            screenshot(chromium, f"{ui}/runs/flow-run/{by_name['classifier']['id']}", out / "logs.png")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
