"""Random kills: SIGKILL the whole `aspire demo` process group at random moments, rerun, compare with a clean run.

Usage: .venv/bin/python -m bench.kill_suite [--root DIR] [--kills 20] [--seed 0] [--min-delay 4] [--max-delay 30]

1. A reference run: `aspire demo --workdir <root>/reference`, uninterrupted.
2. The killed run: `aspire demo --workdir <root>/killed` started in its own process group, killed with SIGKILL
   (the CLI, Prefect's temporary server, every worker) after a random delay, rerun, ... until ``--kills`` kills
   have landed; then rerun to completion. The stage running at each kill is read from the run's log.
3. Compared: report.json (timings aside), every stage's row count and key (`aspire status`), the exported
   dataset (file set, metadata rows, duplicated image ids), and leftovers: temporary folders, lock files,
   processes of a killed group still alive.

``--targets ingest,export,report`` aims the kills instead: each lands 0.1-1.5 s after the named stage begins (or, for
``report``, after retrain finished, while the report is written), ``--kills`` times per target.

Results: ``<root>/kill_suite.json`` and a markdown table on stdout (BENCHMARKS.md "Random kills").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASPIRE = [str(Path(sys.executable).with_name("aspire"))]  # the installed CLI, as a user runs it


started = [0.0]  # when the current attempt started (perf_counter)


def start(workdir: Path, log: Path) -> subprocess.Popen:
    started[0] = time.perf_counter()
    with open(log, "w") as out:
        return subprocess.Popen([*ASPIRE, "demo", "--workdir", str(workdir)], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_stage(process: subprocess.Popen, log: Path, stage: str, timeout: float = 600.0) -> float:
    """Seconds from the attempt's start until ``stage`` begins in its log ('report': retrain has finished)."""
    marker = "Flow run 'retrain' - Finished in state" if stage == "report" else f"Beginning subflow run '{stage}'"
    while process.poll() is None and time.perf_counter() - started[0] < timeout:
        if marker in log.read_text(errors="replace"):
            break
        time.sleep(0.05)
    return time.perf_counter() - started[0]


def stage_at_kill(log: Path) -> str:
    text = log.read_text(errors="replace")
    begun = re.findall(r"Beginning subflow run '([a-z]+)'", text)
    if not begun:
        return "start-up (imports, preflight, Prefect server)"
    last = begun[-1]
    return f"{last} (finished)" if f"Flow run '{last}' - Finished" in text.split(f"Beginning subflow run '{last}'")[-1] else last


def alive_in_group(pgid: int) -> list[str]:
    """Processes of the killed group still running (zombies, dead and waiting to be reaped, are not counted), and
    any Prefect server orphaned (its parent gone: a server of another program running on the machine, a test
    session say, is not a leftover)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,pgid,stat,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    return [line.strip() for line in out if not line.split()[3].startswith("Z")
            and (line.split()[2] == str(pgid) or ("prefect.server" in line and line.split()[1] == "1"))]


def demo_sets(workdir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """``--set`` arguments that run configs/demo.yaml in ``workdir``, as ``aspire demo --workdir`` does."""
    benchmark = workdir / "benchmark"
    sets = [f"workdir={json.dumps(str(workdir))}", f"dataset.root={json.dumps(str(benchmark))}",
            f"background.bank={json.dumps(str(benchmark / 'backgrounds'))}", *extra]
    return [arg for s in sets for arg in ("--set", s)]


def status(workdir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    args = ["status", str(REPO / "configs" / "demo.yaml"), *demo_sets(workdir, extra)]
    return subprocess.run([*ASPIRE, *args], cwd=REPO, capture_output=True, text=True).stdout.splitlines()


def export_files(workdir: Path, key: str = "*") -> dict:
    """The exported dataset's files and rows (``key``: the export stage's key when a workdir holds several)."""
    import pyarrow.parquet as pq

    (data,) = [p for p in (workdir / "export").glob(f"{key}/dataset/data") if p.is_dir()]
    files = sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file())
    ids = [i for meta in data.glob("*/metadata.parquet") for i in pq.read_table(meta).column("image_id").to_pylist()]
    return {"files": files, "rows": len(ids), "duplicated_ids": len(ids) - len(set(ids))}


def leftovers(workdir: Path) -> dict:
    return {"tmp_folders": sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*.tmp-*")),
            "lock_files": sum(1 for _ in workdir.rglob(".*.lock"))}


def comparable(workdir: Path) -> dict:
    report = json.loads((workdir / "report.json").read_text())
    return {k: v for k, v in report.items() if k != "stages"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "data" / "runs" / "kill_suite")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-delay", type=float, default=4.0)
    parser.add_argument("--max-delay", type=float, default=30.0)
    parser.add_argument("--targets", default="", help="Comma-separated stages to kill inside, in pipeline order "
                        "(each kill lands 0.1-1.5 s after the stage begins; 'report' = after retrain finished, while "
                        "the report is written), instead of random delays; each target is killed --kills times.")
    args = parser.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    reference, killed = root / "reference", root / "killed"
    if not (reference / "report.json").is_file():
        t0 = time.perf_counter()
        assert start(reference, root / "reference.log").wait() == 0, "the reference run failed"
        print(f"reference run: {time.perf_counter() - t0:.0f} s", flush=True)

    kills, attempt, t0 = [], 0, time.perf_counter()
    targets = [t for t in args.targets.split(",") if t for _ in range(args.kills)]
    while len(kills) < (len(targets) or args.kills):
        attempt += 1
        log = root / f"killed-{attempt:02d}.log"
        process = start(killed, log)
        delay = rng.uniform(args.min_delay, args.max_delay)
        if targets:
            delay = wait_for_stage(process, log, targets[len(kills)]) + rng.uniform(0.1, 1.5)
        try:
            process.wait(timeout=max(0.0, delay - (time.perf_counter() - started[0])) if targets else delay)
        except subprocess.TimeoutExpired:
            stage = stage_at_kill(log)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            time.sleep(1.0)
            left = alive_in_group(process.pid)
            kills.append({"attempt": attempt, "after_s": round(delay, 1), "stage": stage, "alive_after": left})
            print(f"kill {len(kills)}: after {delay:.1f} s in {stage}" + (f", still alive: {left}" if left else ""),
                  flush=True)
            continue
        print(f"attempt {attempt} finished before its kill ({delay:.1f} s, exit {process.returncode})", flush=True)
        if process.returncode == 0:
            break  # the run completed: no more to kill; the remaining kills are not possible
    final = start(killed, root / "killed-final.log").wait()
    results = {
        "kills": kills, "attempts": attempt, "final_exit": final, "minutes": round((time.perf_counter() - t0) / 60, 1),
        "report_identical": comparable(killed) == comparable(reference),
        "status_identical": [l.split()[:3] + l.split()[4:] for l in status(killed)]
                            == [l.split()[:3] + l.split()[4:] for l in status(reference)],
        "export": {"killed": {k: v for k, v in export_files(killed).items() if k != "files"},
                   "reference": {k: v for k, v in export_files(reference).items() if k != "files"},
                   "same_files": export_files(killed)["files"] == export_files(reference)["files"]},
        "leftovers": {"killed": leftovers(killed), "reference": leftovers(reference)},
    }
    (root / "kill_suite.json").write_text(json.dumps(results, indent=1))
    stages = sorted({k["stage"].split(" (")[0] for k in kills})
    print(f"\n| kills | resumed | report identical | status identical | export rows killed / reference | duplicated ids "
          f"| same files | tmp folders left | lock files killed / reference | processes alive after a kill |\n"
          f"|---|---|---|---|---|---|---|---|---|---|\n"
          f"| {len(kills)} | {'yes' if final == 0 else 'no'} | {results['report_identical']} | {results['status_identical']} "
          f"| {results['export']['killed']['rows']} / {results['export']['reference']['rows']} "
          f"| {results['export']['killed']['duplicated_ids']} | {results['export']['same_files']} "
          f"| {len(results['leftovers']['killed']['tmp_folders'])} | {results['leftovers']['killed']['lock_files']} / "
          f"{results['leftovers']['reference']['lock_files']} | {sum(bool(k['alive_after']) for k in kills)} |")
    print(f"\nstages at the kills: {', '.join(stages)}")


if __name__ == "__main__":
    main()
