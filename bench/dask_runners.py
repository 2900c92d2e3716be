"""The Dask runner against the thread runner: the demo, cold, with 1 and 2 Dask worker processes and 2 threads.

Usage: .venv/bin/python -m bench.dask_runners [--root DIR] [--runners threads:2,dask:1,dask:2]

Each runner setting runs ``aspire run configs/demo.yaml`` in its own workdir (each draws the same benchmark: one
seed, byte-identical files; the draw is outside the stages' seconds). Per stage: seconds from report.json, and the speed-up of the last setting
over the second (dask:2 over dask:1 by default). Results: ``<root>/dask_runners.json`` and a markdown table on
stdout (BENCHMARKS.md "Dask runner").
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from bench.kill_suite import ASPIRE, REPO, comparable, demo_sets

DEMO = REPO / "configs" / "demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "data" / "runs" / "dask_runners")
    parser.add_argument("--runners", default="threads:2,dask:1,dask:2")
    args = parser.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    for setting in args.runners.split(","):
        kind, workers = setting.split(":")
        workdir = root / setting.replace(":", "-")
        shutil.rmtree(workdir, ignore_errors=True)
        extra = (f"runner.kind={kind}", f"runner.n_workers={workers}")
        t0 = time.perf_counter()
        with open(root / f"{workdir.name}.log", "w") as log:
            code = subprocess.run([*ASPIRE, "run", str(DEMO), *demo_sets(workdir, extra)], cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT).returncode
        assert code == 0, f"{setting} failed: see {root / f'{workdir.name}.log'}"
        report = json.loads((workdir / "report.json").read_text())
        results[setting] = {"seconds": round(time.perf_counter() - t0, 1),
                            "stages": {k: v.get("seconds", 0.0) for k, v in report["stages"].items()},
                            "report": comparable(workdir)}
        print(setting, results[setting]["seconds"], flush=True)
    (root / "dask_runners.json").write_text(json.dumps(results, indent=1))
    names = list(results)
    same = all(results[n]["report"] == results[names[0]]["report"] for n in names)
    print(f"\nreports identical across runners: {same}\n")
    print("| stage | " + " | ".join(f"{n} s" for n in names) + f" | {names[-1]} / {names[-2]} speed-up |")
    print("|---|" + "---|" * (len(names) + 1))
    for stage in results[names[0]]["stages"]:
        cells = [results[n]["stages"].get(stage, 0.0) for n in names]
        speedup = cells[-2] / cells[-1] if cells[-1] else float("nan")
        print(f"| {stage} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {speedup:.2f} |")
    totals = [results[n]["seconds"] for n in names]
    print("| whole run (wall) | " + " | ".join(f"{t:.0f}" for t in totals) + f" | {totals[-2] / totals[-1]:.2f} |")


if __name__ == "__main__":
    main()
