"""Concurrent runs: two runs on one workdir at the same time, compared with runs made alone.

Usage: .venv/bin/python -m bench.concurrent_runs [--root DIR]

1. References: configs/demo.yaml (A) and A with ``collapse.top_k=2`` (B: same stages up to background, different
   from collapse on), each run alone in its own workdir.
2. Same config twice: two ``aspire run`` of A on one workdir, the second started 2 s after the first, while
   ``aspire status`` is polled every few seconds.
3. Two configs sharing upstream stages: A and B started together on one workdir.

Checked: both runs exit 0; each shard of a shared stage (the same key for both configs) is computed by exactly one run (the other waits for its
lock and reuses it: the "N of M shards computed here" log lines); afterwards every stage is intact with the
reference's keys and row counts (`aspire status`); the export has the reference's files and rows, no duplicated
id; the report a warm rerun of each config writes equals its reference; no temporary folder left; and every
`aspire status` answer during the runs was well formed (exit 0, one line per stage) and consistent (a stage shown
done stays done, and never before the stage above it).

Results: ``<root>/concurrent_runs.json`` and markdown tables on stdout (BENCHMARKS.md "Concurrent runs").
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from bench.kill_suite import ASPIRE, REPO, comparable, demo_sets, export_files, leftovers, status

DEMO = REPO / "configs" / "demo.yaml"
B = ("collapse.top_k=2",)
STAGES = ("ingest", "classifier", "holdout", "caption", "extract", "remove", "background", "collapse", "personalize",
          "generate", "export", "retrain")


def start(workdir: Path, log: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        return subprocess.Popen([*ASPIRE, "run", str(DEMO), *demo_sets(workdir, extra)], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)


def computed(log: Path) -> dict[str, tuple[int, int]]:
    """stage -> (shards this run computed, shards) from its log ("cached" stages: (0, 0))."""
    text = log.read_text(errors="replace")
    found = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"(\w+): done in [\d.]+ s \(\d+ rows, (\d+) of (\d+) shards", text)}
    for stage in re.findall(r"(\w+): cached \(", text):
        found.setdefault(stage, (0, 0))
    return found


def poll_status(workdir: Path, extra: tuple[str, ...], processes: list[subprocess.Popen]) -> dict:
    """``aspire status`` every few seconds while any process runs; returns the answers and their consistency."""
    answers, problems = [], []
    done_before: set[str] = set()
    while any(p.poll() is None for p in processes):
        t = time.perf_counter()
        proc = subprocess.run([*ASPIRE, "status", str(DEMO), *demo_sets(workdir, extra)], cwd=REPO,
                              capture_output=True, text=True)
        lines = proc.stdout.splitlines()
        states = {line.split()[0]: " ".join(line.split()[1:]).split(" rows=")[0] for line in lines if line.split()}
        answers.append({"seconds": round(time.perf_counter() - t, 1), "states": states})
        if proc.returncode != 0 or list(states) != list(STAGES):
            problems.append(f"malformed answer (exit {proc.returncode}): {proc.stdout[-200:]} {proc.stderr[-300:]}")
        done = {s for s, v in states.items() if v == "done"}
        if done_before - done:
            problems.append(f"done, then not done: {sorted(done_before - done)}")
        for above, below in zip(STAGES, STAGES[1:]):
            if below in done and above not in done:
                problems.append(f"{below} done before {above}")
        done_before |= done
        time.sleep(3)
    running = sum(any(v.startswith("running") for v in a["states"].values()) for a in answers)
    return {"answers": len(answers), "answers_showing_a_running_stage": running, "problems": problems,
            "slowest_answer_s": max((a["seconds"] for a in answers), default=0), "timeline": answers}


def reference(root: Path, name: str, extra: tuple[str, ...]) -> Path:
    workdir = root / f"reference-{name}"
    if not (workdir / "report.json").is_file():
        t0 = time.perf_counter()
        assert start(workdir, root / f"reference-{name}.log", extra).wait() == 0, f"reference {name} failed"
        print(f"reference {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return workdir


def compare(workdir: Path, ref: Path, extra: tuple[str, ...], log: Path) -> dict:
    """A warm rerun of the config writes its report; compare it and the stages with the reference."""
    warm = start(workdir, log, extra).wait()
    lines, ref_lines = status(workdir, extra), status(ref, extra)
    key = next(line.split("key=")[1] for line in lines if line.startswith("export"))
    export, ref_export = export_files(workdir, key), export_files(ref)
    return {"warm_rerun_exit": warm, "report_identical": comparable(workdir) == comparable(ref),
            "status_identical": [l.split()[:3] + l.split()[4:] for l in lines]
                                == [l.split()[:3] + l.split()[4:] for l in ref_lines],
            "export_rows": export["rows"], "reference_export_rows": ref_export["rows"],
            "duplicated_ids": export["duplicated_ids"], "same_files": export["files"] == ref_export["files"]}


def scenario(root: Path, name: str, configs: list[tuple[str, tuple[str, ...], Path]], delay: float) -> dict:
    workdir = root / name
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    logs = [root / f"{name}-{label}.log" for label, _, _ in configs]
    processes = []
    for (label, extra, _), log in zip(configs, logs):
        processes.append(start(workdir, log, extra))
        time.sleep(delay)
    polled = poll_status(workdir, configs[0][1], processes)
    exits = [p.wait() for p in processes]
    minutes = round((time.perf_counter() - t0) / 60, 1)
    per_run = [computed(log) for log in logs]
    keys = [{line.split()[0]: line.split("key=")[-1] for line in status(workdir, extra)} for _, extra, _ in configs]
    shared = [s for s in STAGES if len({k[s] for k in keys}) == 1 and all(s in run for run in per_run)]
    once = {s: sum(run[s][0] for run in per_run) == max(run[s][1] for run in per_run) for s in shared}
    result = {"exits": exits, "minutes": minutes, "computed_per_run": per_run, "shared_stages": shared,
              "every_shared_shard_computed_once": all(once.values()), "not_once": [s for s, ok in once.items() if not ok],
              "status_during": {k: v for k, v in polled.items() if k != "timeline"},
              "leftovers": leftovers(workdir)}
    result["configs"] = {label: compare(workdir, ref, extra, root / f"{name}-{label}-warm.log")
                         for label, extra, ref in configs}
    (root / f"{name}-status-timeline.json").write_text(json.dumps(polled["timeline"], indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "data" / "runs" / "concurrent_runs")
    args = parser.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    ref_a, ref_b = reference(root, "a", ()), reference(root, "b", B)
    results = {
        "same config twice": scenario(root, "same-config", [("A", (), ref_a), ("A again", (), ref_a)], delay=2.0),
        "two configs sharing upstream": scenario(root, "shared-upstream", [("A", (), ref_a), ("B", B, ref_b)],
                                                 delay=0.0),
    }
    (root / "concurrent_runs.json").write_text(json.dumps(results, indent=1))
    print("| scenario | exits | minutes | each shared shard computed once | status answers (showing a running stage) "
          "| status problems | tmp left |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        s = r["status_during"]
        print(f"| {name} | {r['exits']} | {r['minutes']} | {r['every_shared_shard_computed_once']} {r['not_once'] or ''} "
              f"| {s['answers']} ({s['answers_showing_a_running_stage']}) | {len(s['problems'])} "
              f"| {len(r['leftovers']['tmp_folders'])} |")
    print("\n| scenario | config | warm rerun exit | report = reference | stages = reference | export rows / reference "
          "| duplicated ids | same files |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for label, c in r["configs"].items():
            print(f"| {name} | {label} | {c['warm_rerun_exit']} | {c['report_identical']} | {c['status_identical']} "
                  f"| {c['export_rows']} / {c['reference_export_rows']} | {c['duplicated_ids']} | {c['same_files']} |")


if __name__ == "__main__":
    main()
