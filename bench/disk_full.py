"""Disk full: `aspire demo` on a small tmpfs that fills at different stages, then resumed after space is freed.

Usage (as root: it mounts tmpfs): .venv/bin/python -m bench.disk_full [--root DIR] [--sizes 12,19,26,34]
    [--reference DIR]

Per size (MB): mount a tmpfs of that size, run `aspire demo --workdir <tmpfs>/run` (the benchmark is drawn there
too), and record the exit status, the one-line message and the stage it stopped in. Then check that every marker on
the disk is intact (each committed part's files match their digests, each stage marker its rows), grow the tmpfs
to 512 MB (``mount -o remount``), rerun the same command and compare its report with a run that never ran out
of space (``--reference``: a finished demo workdir, e.g. the concurrency benchmark's reference, else one is run).

Results: ``<root>/disk_full.json`` and a markdown table on stdout (BENCHMARKS.md "Disk full").
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from aspire.cache import MARKER, read_part_marker
from bench.kill_suite import ASPIRE, REPO, comparable, leftovers


def mount(point: Path, megabytes: int, remount: bool = False) -> None:
    point.mkdir(parents=True, exist_ok=True)
    options = f"{'remount,' if remount else ''}size={megabytes}m"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)


def demo(workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*ASPIRE, "demo", "--workdir", str(workdir)], cwd=REPO, capture_output=True, text=True)


def markers_intact(workdir: Path) -> tuple[int, int]:
    """(markers found, markers whose part or stage is intact); a part's marker checks its files' digests."""
    from aspire.cache import ROWS, file_digest

    found = intact = 0
    for marker in workdir.rglob(MARKER):
        found += 1
        folder = marker.parent
        if (folder / ROWS).is_file() and "digest" in json.loads(marker.read_text()):  # a stage marker
            intact += file_digest(folder / ROWS) == json.loads(marker.read_text())["digest"]
        else:
            intact += read_part_marker(folder) is not None
    return found, intact


def last_stage(text: str) -> str:
    begun = re.findall(r"Beginning subflow run '([a-z]+)'", text)
    return begun[-1] if begun else "before the stages (benchmark draw)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/aspire-disk-full"))
    parser.add_argument("--sizes", default="12,19,26,34")
    parser.add_argument("--reference", type=Path, default=None)
    args = parser.parse_args()
    root = args.root.resolve()
    reference = args.reference or root / "reference"
    if not (reference / "report.json").is_file():
        assert demo(reference).returncode == 0, "the reference run failed"
    results = []
    for megabytes in (int(s) for s in args.sizes.split(",")):
        point = root / f"tmpfs-{megabytes}"
        try:
            mount(point, megabytes)
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            sys.exit(f"cannot mount a tmpfs at {point} ({exc}); run as root")
        try:
            workdir = point / "run"
            t0 = time.perf_counter()
            full = demo(workdir)
            seconds = time.perf_counter() - t0
            text = full.stdout + full.stderr
            (root / f"full-{megabytes}.log").write_text(text)
            red = [line for line in full.stderr.splitlines() if line.startswith("stopped:")]
            found, intact = markers_intact(workdir)
            mount(point, 512, remount=True)
            resumed = demo(workdir)
            (root / f"resumed-{megabytes}.log").write_text(resumed.stdout + resumed.stderr)
            results.append({
                "size_mb": megabytes, "exit": full.returncode, "seconds": round(seconds, 1),
                "stopped_in": last_stage(text), "message": red[0] if red else full.stderr.strip().splitlines()[-1:],
                "traceback": "Traceback" in text, "markers": found, "markers_intact": intact,
                "tmp_left_after_resume": len(leftovers(workdir)["tmp_folders"]), "resumed_exit": resumed.returncode,
                "report_identical": resumed.returncode == 0 and comparable(workdir) == comparable(reference),
            })
            print(json.dumps(results[-1]), flush=True)
        finally:
            subprocess.run(["umount", str(point)], check=False)
    (root / "disk_full.json").write_text(json.dumps(results, indent=1))
    print("| tmpfs | exit | stopped in | message | traceback | markers intact | resumed | report = never-full run "
          "| tmp left |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        message = str(r["message"]).replace(str(root), "<tmpfs>").replace("|", "\\|")
        print(f"| {r['size_mb']} MB | {r['exit']} | {r['stopped_in']} | {message} | {r['traceback']} "
              f"| {r['markers_intact']} / {r['markers']} | exit {r['resumed_exit']} | {r['report_identical']} "
              f"| {r['tmp_left_after_resume']} |")


if __name__ == "__main__":
    main()
