"""The holdout stage's own work per row at 1x and 16x the demo's train size, outside a run.

Usage: PYTHONPATH=. .venv/bin/python -m bench.holdout_rows [--repeats 5]

What the holdout stage computes and commits (``select_holdout``, ``evaluate``, ``StageStore.commit_stage`` into a
temporary folder) on manifests shaped like the demo's classifier output: 720 val/test rows and 1,200 x scale train
rows, timed per row, median of ``--repeats``. Each size runs once alone and once with five copies of its manifest
alive, as a run holds upstream stages' rows (the cyclic garbage collector's passes grow with what is alive). Tells
the stage's code from what happens around it in a run (bench/growth.py measures the whole stage in a run).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from aspire.cache import StageStore
from aspire.config import HoldoutConfig
from tasks import holdout

CLASSES, BACKGROUNDS = ("bird", "car", "dog"), ("water", "grass", "snow", "desert")


def manifest(train: int, other: int = 720) -> list[dict]:
    """Rows with the demo classifier output's columns; groups class x background x object."""
    rows = []
    for i in range(train + other):
        label, scene = i % len(CLASSES), BACKGROUNDS[(i // 3) % len(BACKGROUNDS)]
        split = "train" if i < train else ("val", "test")[i % 2]
        obj = i % 5 == 0
        rows.append({"image_id": f"img{i:07d}", "path": f"/data/{split}/{CLASSES[label]}/img{i:07d}.png",
                     "split": split, "label": label, "class_name": CLASSES[label], "dataset_label": label,
                     "scene": scene, "has_object": obj, "objects": ["boat"] if obj else [], "source": "synthetic",
                     "group_name": f"{CLASSES[label]}|{scene}|{'+' if obj else '-'}boat", "group": i % 24,
                     "caption": f"a photo of a {CLASSES[label]} by the {scene}", "boxes": [{"box": [1, 2, 30, 31],
                     "phrase": CLASSES[label]}], "pred": label if i % 7 else (label + 1) % 3,
                     "correct": bool(i % 7), "pred_conf": 0.9})
    return rows


def seconds_per_row(rows: list[dict]) -> float:
    with tempfile.TemporaryDirectory() as folder:
        store = StageStore(Path(folder), "holdout", "key")
        start = time.perf_counter()
        selected = holdout.select_holdout(rows, HoldoutConfig())
        store.commit_stage(selected, {"before": holdout.evaluate(selected)})
        return (time.perf_counter() - start) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| rows | ms per row, alone | ms per row, 5 copies alive |\n|---|---|---|")
    results = {}
    for scale in (1, 16):
        rows = manifest(1200 * scale)
        alone = statistics.median(seconds_per_row(rows) for _ in range(args.repeats))
        live = [[dict(r) for r in rows] for _ in range(5)]
        crowded = statistics.median(seconds_per_row(rows) for _ in range(args.repeats))
        del live
        results[scale] = (alone, crowded)
        print(f"| {len(rows):,} | {1000 * alone:.4f} | {1000 * crowded:.4f} |")
    print(f"\n16x / 1x per row: alone {results[16][0] / results[1][0]:.2f}, "
          f"with copies alive {results[16][1] / results[1][1]:.2f}")


if __name__ == "__main__":
    main()
