"""Bad data: every kind of ``tests/bad_data.py`` through the real CLI, as a user meets it.

Usage: PYTHONPATH=tests .venv/bin/python -m bench.bad_data [--root DIR]

1. Each ``rejected`` kind is planted in the corpus's small base dataset and ``aspire run configs/demo.yaml`` is
   pointed at it: expected exit 2 within seconds (before Prefect starts), one problem line naming the file.
2. Every ``quarantined`` and ``loaded`` kind is planted together in the demo's synthetic benchmark (train split,
   with captions and the class's group, no boxes), and the whole pipeline runs on it to the end: expected exit 0,
   one quarantine record per quarantined kind with its reason, and every loaded kind's image through ingest,
   training and export (in the exported dataset, as RGB).

Results: ``<root>/bad_data.json`` and a markdown table on stdout (BENCHMARKS.md "Bad data").
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bad_data import KINDS, Kind, base_dataset

from aspire.config import load_config
from aspire.synth import draw_background_bank, draw_benchmark
from aspire.manifest import digest

REPO = Path(__file__).resolve().parents[1]
ASPIRE = [str(Path(sys.executable).with_name("aspire"))]
DEMO = REPO / "configs" / "demo.yaml"


def overrides(workdir: Path, root: Path, bank: Path, synth: bool) -> list[str]:
    sets = [f"workdir={json.dumps(str(workdir))}", f"dataset.root={json.dumps(str(root))}",
            f"background.bank={json.dumps(str(bank))}"]
    if not synth:
        sets.append("synth=null")
    return [arg for s in sets for arg in ("--set", s)]


def draw_demo_benchmark(root: Path) -> None:
    """The demo's benchmark, drawn as the flow draws it (so the flow leaves it as it is)."""
    config = load_config(DEMO)
    draw_benchmark(config.synth, root)
    draw_background_bank(config.synth, root / "backgrounds")
    (root / ".synth-digest").write_text(digest(config.synth))


def plant_in_benchmark(root: Path, kinds: list[Kind], scratch: Path) -> dict[str, str]:
    """Plant each kind's file in the benchmark's train split; returns kind name -> the planted file's path."""
    meta = root / "train" / "metadata.csv"
    with open(meta, newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, list(reader)
    template = next(r for r in rows if r["has_object"] == "False")
    planted: dict[str, str] = {}
    for i, kind in enumerate(kinds):
        base = scratch / f"kind-{i}"
        base_dataset(base)
        path = kind.plant(base)
        if path.name.startswith("metadata"):  # a metadata kind (the BOM): applied to the benchmark's own file
            continue
        name = f"bad-{i:02d}-{path.name}"
        target = root / "train" / template["class_name"] / name
        if path.is_dir():
            target.mkdir()
        elif path.exists():
            shutil.copyfile(path, target)
        rows.append({**template, "file_name": f"{template['class_name']}/{name}", "image_id": f"bad-{i:02d}",
                     "boxes": "[]", "objects": "[]", "caption": f"a photo of a {template['class_name']}"})
        planted[kind.name] = str(target)
    with open(meta, "w", newline="", encoding="utf-8-sig" if any(k.name.startswith("UTF-8 BOM") for k in kinds)
              else "utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return planted


def rejected(kind: Kind, root: Path, bank: Path) -> dict:
    data = root / "data"
    base_dataset(data)
    at_fault = kind.plant(data)
    start = time.perf_counter()
    proc = subprocess.run([*ASPIRE, "run", str(DEMO), *overrides(root / "run", data, bank, synth=False)],
                          cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    problems = [line for line in proc.stderr.splitlines() if line and not line.startswith("(")]
    message = problems[0] if problems else ""
    ok = (proc.returncode == 2 and len(problems) == 1 and str(at_fault) in message and kind.names in message
          and re.search(kind.words, message) is not None and "Traceback" not in proc.stderr
          and not (root / "run").exists())
    return {"kind": kind.name, "expect": "rejected", "ok": ok, "exit": proc.returncode, "seconds": round(seconds, 1),
            "problem_lines": len(problems), "outcome": message.replace(str(data), "<root>")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/aspire-bad-data"))
    args = parser.parse_args()
    root = args.root.resolve()
    shutil.rmtree(root, ignore_errors=True)
    benchmark = root / "pipeline" / "benchmark"
    draw_demo_benchmark(benchmark)
    bank = benchmark / "backgrounds"

    results = [rejected(kind, root / f"rejected-{i:02d}", bank)
               for i, kind in enumerate(KINDS) if kind.expect == "rejected"]

    in_run = [k for k in KINDS if k.expect in ("quarantined", "loaded")]
    planted = plant_in_benchmark(benchmark, in_run, root / "scratch")
    workdir = root / "pipeline" / "run"
    start = time.perf_counter()
    proc = subprocess.run([*ASPIRE, "run", str(DEMO), *overrides(workdir, benchmark, bank, synth=True)],
                          cwd=REPO, capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    (root / "pipeline" / "run.log").write_text(proc.stdout + proc.stderr)
    quarantine = {}
    if (workdir / "quarantine.csv").is_file():
        with open(workdir / "quarantine.csv", newline="") as f:
            quarantine = {r["path"]: r for r in csv.DictReader(f)}
    exported = {}
    for meta in (workdir / "export").glob("*/dataset/data/train/metadata.parquet"):
        import pyarrow.parquet as pq

        exported = {r["image_id"]: r["file_name"] for r in pq.read_table(meta).to_pylist()}
    for i, kind in enumerate(in_run):
        path = planted.get(kind.name)
        record = quarantine.get(path or "")
        if kind.expect == "quarantined":
            ok = record is not None and re.search(kind.words, record["reason"]) is not None
            outcome = f"quarantined at {record['stage']}: {record['reason']}" if record else "not quarantined"
        elif path is None:
            ok, outcome = proc.returncode == 0, "read (the benchmark's own metadata.csv)"
        else:
            image_id = f"bad-{i:02d}"
            ok = record is None and image_id in exported
            outcome = f"exported as {exported[image_id]}" if image_id in exported else (
                f"quarantined: {record['reason']}" if record else "missing from the export")
        results.append({"kind": kind.name, "expect": kind.expect, "ok": ok and proc.returncode == 0,
                        "outcome": outcome.replace(str(benchmark), "<root>")})
    summary = {"pipeline_exit": proc.returncode, "pipeline_minutes": round(minutes, 1),
               "quarantine_records": len(quarantine), "kinds": len(results),
               "as_expected": sum(r["ok"] for r in results)}
    (root / "bad_data.json").write_text(json.dumps({"summary": summary, "results": results}, indent=2))
    print("| kind | expected | outcome | as expected |")
    print("|---|---|---|---|")
    for r in results:
        extra = f" (exit {r['exit']}, {r['seconds']} s, {r['problem_lines']} problem line)" if "exit" in r else ""
        outcome = r["outcome"].replace("|", "\\|")
        print(f"| {r['kind']} | {r['expect']} | {outcome}{extra} | {'yes' if r['ok'] else '**no**'} |")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
