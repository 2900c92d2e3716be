"""Stage ``export``: the augmented training set on disk, for robust trainers.

The dataset's own rows (every split) plus the generated rows, written as an image folder with one
``metadata.parquet`` per split (:func:`aspire.imagefolder.write_imagefolder`; ``datasets.load_dataset("imagefolder")``
and torchvision ``ImageFolder`` read it with the same class numbering as the manifest and the checkpoint), and, when the input was Waterbirds, a Waterbirds-style
``metadata.csv`` at the root (``img_id, img_filename, y, split, place, place_filename``) so Waterbirds loaders
read it too. Generated rows carry ``source``, ``generator``, ``seed``, ``spurious_avoided`` and a group of their own
per class (:func:`with_generated_groups`).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from aspire.imagefolder import write_imagefolder
from aspire.manifest import Row

STAGE = "export"
VERSION = 1
DATASET_PART = "dataset"
RUN_COLUMNS = ("pred", "pred_conf", "correct", "holdout")  # the pipeline's own columns, not the dataset's
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def augmented_rows(dataset_rows: list[Row], generated: list[Row]) -> list[Row]:
    """The dataset's rows without the pipeline's prediction columns (``source="original"``, a reader's own
    ``source`` such as ``synthetic`` kept as ``dataset_source``), then the generated rows (``source="generated"``).

    Original rows get ``generator="none"``, ``seed=-1`` and ``spurious_avoided=[]``, so those columns have a
    value in every row."""
    originals = []
    for row in dataset_rows:
        kept = {k: v for k, v in row.items() if k not in RUN_COLUMNS}
        if kept.get("source") not in (None, "original"):
            kept["dataset_source"] = kept["source"]
        originals.append({**kept, "source": "original", "generator": "none", "seed": -1, "spurious_avoided": []})
    return originals + [{**g, "source": "generated"} for g in generated]


def with_generated_groups(rows: list[Row]) -> list[Row]:
    """Generated rows get a group of their own per class (``augmented:<class>``), numbered after the dataset's
    groups, so group-aware trainers (Group DRO, DFR) and per-group reports see them. Idempotent: the numbering
    depends on the original rows' groups only, so rows read back from an export keep their groups."""
    top = max((r["group"] for r in rows if r.get("group") is not None and r.get("source") != "generated"), default=-1)
    return [{**r, "group": top + 1 + r["label"], "group_name": f"augmented:{r['class_name']}"}
            if r.get("source") == "generated" else r for r in rows]


def write_waterbirds_metadata(rows: list[Row], out_dir: Path) -> Path:
    """``metadata.csv`` in the Waterbirds layout for exported rows. Generated images get the place opposite
    to their class's majority place in train (they are meant to fill the minority groups)."""
    majority: dict[int, int] = {}
    for label in {r["label"] for r in rows}:
        places = Counter(int(r["place"]) for r in rows if r["label"] == label and r["split"] == "train"
                         and r.get("place") not in (None, ""))
        majority[label] = places.most_common(1)[0][0] if places else 0
    path = out_dir / "metadata.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        for i, row in enumerate(rows):
            generated = row.get("source") == "generated"
            place = 1 - majority[row["label"]] if generated else int(row.get("place") or 0)
            writer.writerow([i, Path(row["path"]).relative_to(out_dir).as_posix(), row["label"], SPLIT_CODES[row["split"]],
                             place, "generated" if generated else row.get("place_filename", "")])
    return path


def run_export(rows: list[Row], out_dir: Path, waterbirds: bool) -> tuple[list[Row], dict]:
    """Write the augmented dataset into ``out_dir``; return its rows (paths inside it) and counts."""
    exported = write_imagefolder(with_generated_groups(rows), out_dir)
    if waterbirds:
        write_waterbirds_metadata(exported, out_dir)
    counts = Counter((r["split"], r["class_name"], r.get("source", "original")) for r in exported)
    return exported, {"rows": len(exported), "generated": sum(r.get("source") == "generated" for r in exported),
                      "by_split_class_source": {"/".join(k): n for k, n in sorted(counts.items())}}
