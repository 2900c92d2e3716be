"""The manifest: the one table every stage reads and writes, one row per image.

A row is a plain ``dict``. Required columns:

- ``image_id`` (str): unique within a manifest.
- ``path`` (str): absolute path of the image file.
- ``label`` (int): class index, 0..K-1.
- ``class_name`` (str): human-readable class name.
- ``split`` (str): one of ``train``, ``val``, ``test``.

Optional columns (absent or ``None`` when unknown):

- ``group`` (int): spurious group id (e.g. Waterbirds ``2*y + place``).
- ``caption`` (str): a caption of the image.
- ``objects`` (list[str]): object phrases known to be in the image.
- ``boxes`` (list[dict]): ``{"phrase": str, "box": [x0, y0, x1, y1]}`` in pixels of the image.
- ``source`` (str): ``original`` for dataset images, a generator name for synthetic ones.

Readers may add more columns (e.g. ``place``, ``background``); stages add columns or rows and never
rewrite the ones they were given.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

Row = dict[str, Any]

REQUIRED_COLUMNS = ("image_id", "path", "label", "class_name", "split")
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest row is malformed; the message names the row and the column."""


def validate_rows(rows: Iterable[Row], where: str = "manifest") -> list[Row]:
    """Check the required columns and types of every row and that image ids are unique.

    Args:
        rows: manifest rows.
        where: a name for the manifest (file or stage) used in error messages.

    Returns:
        The rows as a list.

    Raises:
        ManifestError: naming the first offending row, column and value.
    """
    rows = list(rows)
    seen: set[str] = set()
    for i, row in enumerate(rows):
        for column in REQUIRED_COLUMNS:
            if row.get(column) is None:
                raise ManifestError(f"{where}: row {i} ({row.get('image_id')!r}) has no {column!r}")
        if not isinstance(row["label"], int) or isinstance(row["label"], bool) or row["label"] < 0:
            raise ManifestError(f"{where}: row {i} label={row['label']!r}, expected an int >= 0")
        if row["split"] not in SPLITS:
            raise ManifestError(f"{where}: row {i} split={row['split']!r}, expected one of {SPLITS}")
        if row["image_id"] in seen:
            raise ManifestError(f"{where}: image_id {row['image_id']!r} appears twice")
        seen.add(row["image_id"])
    return rows


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):  # pydantic models hash by their JSON fields, not their repr
        return value.model_dump(mode="json")
    return str(value)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_jsonable)


def digest(value: Any) -> str:
    """SHA-256 (hex, first 16 chars) of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:16]


def write_jsonl(rows: Iterable[Row], path: Path) -> None:
    """Write rows as JSON lines (not atomic by itself: the cache commits the folder)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(canonical_json(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[Row]:
    """Read JSON lines written by :func:`write_jsonl`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def class_names(rows: Iterable[Row]) -> list[str]:
    """Class names ordered by label; raises if a label maps to two names."""
    names: dict[int, str] = {}
    for row in rows:
        known = names.setdefault(row["label"], row["class_name"])
        if known != row["class_name"]:
            raise ManifestError(
                f"label {row['label']} is named both {known!r} and {row['class_name']!r}"
            )
    return [names[k] for k in sorted(names)]
