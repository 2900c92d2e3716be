"""Growth with data size: per-stage seconds per image and peak memory at 1x, 4x and 16x the demo's train size, and
a manifest-only run at CelebA's size.

Usage: .venv/bin/python -m bench.growth [--root DIR] [--scales 1,4,16] [--epochs 2] [--rows 200000]
    [--skip-pipeline] [--skip-manifest]

1. Pipeline: ``aspire run configs/demo.yaml`` (weight-free backends) on the demo's benchmark with
   ``synth.train_per_class`` = 400 x scale (val and test as the demo's), classifier and retrain at ``--epochs``
   epochs (the demo's 6 would make the 16x run take an hour here; the epoch count is the same at every scale, so
   the per-image figures compare). Per stage: seconds (from report.json) / images in, and the peak RSS of the run's
   process while that stage ran (sampled every 0.25 s from /proc, the stage read from the run's log).
2. Manifest only: an ``hf-imagefolder`` dataset of ``--rows`` 8x8 PNGs (and one of ``--rows`` / 16) through
   ``aspire stage ingest`` (listing, keys, sharding, decoding every image, commit), ``aspire status``, and the export
   stage's writer (:func:`aspire.imagefolder.write_imagefolder`: links and one Parquet file per split), timed and
   with peak RSS, per row.

Results: ``<root>/growth.json``, ``<root>/growth.png`` (log-log) and markdown tables on stdout (BENCHMARKS.md
"Growth with data size").
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASPIRE = [str(Path(sys.executable).with_name("aspire"))]
DEMO = REPO / "configs" / "demo.yaml"
DEMO_TRAIN_PER_CLASS = 400


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_sampled(args: list[str], log: Path) -> tuple[int, dict[str, float], float]:
    """Run the CLI; returns (exit, stage -> peak RSS MB while it ran, seconds). The stage is the last one the log
    says began."""
    peaks: dict[str, float] = {}
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([*ASPIRE, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            begun = re.findall(r"Beginning subflow run '([a-z]+)'", log.read_text(errors="replace"))
            stage = begun[-1] if begun else "start-up"
            peaks[stage] = max(peaks.get(stage, 0.0), rss_mb(proc.pid))
            time.sleep(0.25)
    return proc.returncode, peaks, time.perf_counter() - t0


def stage_images(name: str, summary: dict, counts: dict) -> int:
    """The images a stage's work grows with: retraining's training set (train + generated), the generated images,
    else the rows into the stage."""
    if name == "retrain":
        return counts["train"] + counts.get("generated", 0)
    if name == "generate":
        return counts.get("generated", 0)
    return summary.get("rows_in") or summary.get("rows_out") or 0


def pipeline(root: Path, scales: list[int], epochs: int) -> list[dict]:
    results = []
    for scale in scales:
        workdir = root / f"pipeline-{scale}x"
        benchmark = workdir / "benchmark"
        sets = [f"workdir={json.dumps(str(workdir))}", f"dataset.root={json.dumps(str(benchmark))}",
                f"background.bank={json.dumps(str(benchmark / 'backgrounds'))}",
                f"synth.train_per_class={DEMO_TRAIN_PER_CLASS * scale}", f"classifier.epochs={epochs}",
                f"retrain.epochs={epochs}"]
        code, peaks, seconds = run_sampled(["run", str(DEMO), *[a for s in sets for a in ("--set", s)]],
                                           root / f"pipeline-{scale}x.log")
        assert code == 0, f"the {scale}x run failed: see {root / f'pipeline-{scale}x.log'}"
        report = json.loads((workdir / "report.json").read_text())
        stages = {}
        for name, summary in report["stages"].items():
            images = stage_images(name, summary, report["counts"])
            stages[name] = {"seconds": summary.get("seconds", 0.0), "images": images,
                            "ms_per_image": round(1000 * summary.get("seconds", 0.0) / max(images, 1), 3),
                            "peak_rss_mb": round(peaks.get(name, 0.0))}
        results.append({"scale": scale, "train": report["counts"]["train"], "seconds": round(seconds, 1),
                        "peak_rss_mb": round(max(peaks.values())), "stages": stages})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "stages"}), flush=True)
    return results


def tiny_dataset(root: Path, rows: int) -> None:
    """``rows`` 8x8 PNGs in train/val/test (80/10/10) x 2 classes, with one metadata.csv per split."""
    import io

    from PIL import Image

    encoded = []
    for colour in range(16):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (colour * 16, 80, 160)).save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    splits = {"train": int(rows * 0.8), "val": rows // 10}
    splits["test"] = rows - sum(splits.values())
    for split, n in splits.items():
        lines = ["file_name,label"]
        for label, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(label, n, 2):
                (folder / f"{i:07d}.png").write_bytes(encoded[i % 16])
                lines.append(f"{name}/{i:07d}.png,{label}")
        (root / split / "metadata.csv").write_text("\n".join(lines) + "\n")


def export_timed(config_path: Path, out: Path) -> dict:
    """The export stage's writer over the committed ingest rows, in a child process (its own peak RSS)."""
    code = f"""
import json, resource, time
from aspire.config import load_config
from flows.keys import chain
from tasks.ingest import list_dataset
from aspire.imagefolder import write_imagefolder
config = load_config({str(config_path)!r})
name, store = next(chain(config, list_dataset(config)))
rows = store.read_rows()
t0 = time.perf_counter()
write_imagefolder(rows, {str(out)!r})
print(json.dumps({{"rows": len(rows), "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def manifest(root: Path, total: int) -> list[dict]:
    import yaml

    from aspire.config import load_config

    (root / "bank" / "plain").mkdir(parents=True, exist_ok=True)
    results = []
    for rows in (total // 16, total):
        data, workdir = root / f"manifest-{rows}" / "data", root / f"manifest-{rows}" / "run"
        t0 = time.perf_counter()
        if not (data / "test" / "metadata.csv").is_file():
            tiny_dataset(data, rows)
        made = time.perf_counter() - t0
        sets = [f"workdir={json.dumps(str(workdir))}", f"dataset.root={json.dumps(str(data))}", "synth=null",
                f"background.bank={json.dumps(str(root / 'bank'))}"]
        path = root / f"manifest-{rows}" / "config.yaml"
        path.write_text(yaml.safe_dump(load_config(DEMO, sets).model_dump(mode="json")))
        code, peaks, ingest_s = run_sampled(["stage", "ingest", str(path)], root / f"manifest-{rows}-ingest.log")
        assert code == 0, f"ingest of {rows} rows failed: see {root / f'manifest-{rows}-ingest.log'}"
        code, status_peaks, status_s = run_sampled(["status", str(path)], root / f"manifest-{rows}-status.log")
        assert code == 0
        export = export_timed(path, root / f"manifest-{rows}" / "export")
        results.append({"rows": rows, "dataset_written_s": round(made, 1),
                        "ingest_cli_s": round(ingest_s, 1), "ingest_peak_rss_mb": round(max(peaks.values())),
                        "status_s": round(status_s, 1), "status_peak_rss_mb": round(max(status_peaks.values())),
                        "export_s": round(export["seconds"], 1), "export_peak_rss_mb": round(export["peak_rss_mb"])})
        print(json.dumps(results[-1]), flush=True)
    return results


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = results.get("pipeline", [])
    for i, name in enumerate(runs[0]["stages"] if runs else {}):
        xs = [r["stages"][name]["images"] for r in runs]
        ys = [r["stages"][name]["seconds"] for r in runs]
        if all(x > 0 and y > 0 for x, y in zip(xs, ys)):  # 12 stages: 20 colours, 4 markers
            left.loglog(xs, ys, marker="osD^"[i % 4], color=plt.cm.tab20(i), label=name)
    left.set(xlabel="images into the stage", ylabel="seconds", title="pipeline stages (flat cost: slope 1)")
    left.legend(fontsize=7, ncol=2)
    rows = results.get("manifest", [])
    for key, label in (("ingest_cli_s", "aspire stage ingest"), ("status_s", "aspire status"), ("export_s", "export writer")):
        right.loglog([r["rows"] for r in rows], [max(r[key], 0.01) for r in rows], marker="o", label=label)
    right.set(xlabel="manifest rows", ylabel="seconds", title="manifest only")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "data" / "runs" / "growth")
    parser.add_argument("--scales", default="1,4,16")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-manifest", action="store_true")
    parser.add_argument("--tabulate", action="store_true", help="Only recompute the tables from the saved runs.")
    args = parser.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    saved = root / "growth.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    if args.tabulate:
        args.skip_manifest = args.skip_pipeline = True
        for run in results.get("pipeline", []):
            report = json.loads((root / f"pipeline-{run['scale']}x" / "report.json").read_text())
            for name, figures in run["stages"].items():
                figures["images"] = stage_images(name, report["stages"][name], report["counts"])
                figures["ms_per_image"] = round(1000 * figures["seconds"] / max(figures["images"], 1), 3)
        saved.write_text(json.dumps(results, indent=1))
    if not args.skip_manifest:
        results["manifest"] = manifest(root, args.rows)
        saved.write_text(json.dumps(results, indent=1))
    if not args.skip_pipeline:
        results["pipeline"] = pipeline(root, [int(s) for s in args.scales.split(",")], args.epochs)
        saved.write_text(json.dumps(results, indent=1))
    plot(results, root / "growth.png")
    runs = results.get("pipeline", [])
    if runs:
        print("| stage | " + " | ".join(f"{r['scale']}x ms/image (peak MB)" for r in runs) + " | last / first |")
        print("|---|" + "---|" * (len(runs) + 1))
        for name in runs[0]["stages"]:
            cells = [f"{r['stages'][name]['ms_per_image']} ({r['stages'][name]['peak_rss_mb']})" for r in runs]
            first, last = runs[0]["stages"][name]["ms_per_image"], runs[-1]["stages"][name]["ms_per_image"]
            print(f"| {name} | " + " | ".join(cells) + f" | {last / first if first else float('nan'):.2f} |")
    for r in results.get("manifest", []):
        print(json.dumps(r))


if __name__ == "__main__":
    main()
