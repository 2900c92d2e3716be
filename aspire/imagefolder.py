"""The image-folder layout we write and read (Hugging Face ``imagefolder`` + torchvision ``ImageFolder``).

```
<root>/<split>/metadata.csv              file_name (relative to <root>/<split>), image_id, label, class_name, ...
<root>/<split>/<class_name>/<file>       the images
```

``datasets.load_dataset("imagefolder", data_dir=root)`` reads it with one split per folder, and
``torchvision.datasets.ImageFolder(root / split)`` sees one class per sub-folder. Columns holding lists or
dicts (``objects``, ``boxes``) are stored as JSON strings; ``None`` as an empty cell.

Split folders are named ``train``, ``val`` and ``test``: Hugging Face ``datasets`` maps a folder named
``val`` (like ``valid``, ``validation`` and ``dev``) to its ``validation`` split (``SPLIT_KEYWORDS`` in
``datasets/data_files.py``; checked with datasets 5.0.1), and :mod:`aspire.readers` maps all of those to ``val``.
:func:`write_imagefolder` writes the images as ``<root>/<split>/<class_name>/<image_id><ext>``; path
separators in class names and image ids become ``_``, and a leading ``.`` or ``__`` (which ``datasets`` treats
as hidden) gets an ``x`` in front.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from aspire.manifest import Row

JSON_COLUMNS = ("objects", "boxes", "object_box")
INT_COLUMNS = ("label", "group")
BOOL_COLUMNS = ("has_object", "holdout", "correct")
SKIPPED_COLUMNS = ("path",)  # absolute paths are replaced by file_name
UNSAFE_CHARACTERS = ("/", "\\", "\0", ":")  # ":" also: fsspec (datasets) reads "a::b" as a chained URL

logger = logging.getLogger(__name__)


def _encode(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def write_metadata_csv(rows: list[Row], split_dir: Path) -> Path:
    """Write ``split_dir/metadata.csv`` for rows whose ``path`` lies under ``split_dir``.

    Columns: ``file_name`` first, then every column any row has (sorted), ``path`` left out.

    Raises:
        ValueError: a row's image is not inside ``split_dir``.
    """
    split_dir = Path(split_dir)
    columns = sorted({key for row in rows for key in row} - {"file_name", *SKIPPED_COLUMNS})
    out = split_dir / "metadata.csv"
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", *columns])
        for row in rows:
            path = Path(row["path"])
            if not path.is_relative_to(split_dir):
                raise ValueError(f"image {str(path)!r} of row {row['image_id']!r} is not inside {str(split_dir)!r}")
            writer.writerow([path.relative_to(split_dir).as_posix(), *(_encode(row.get(c)) for c in columns)])
    return out


def decode_metadata_value(column: str, text: str) -> Any:
    """Inverse of the CSV encoding for the known columns; other columns stay strings (empty -> None)."""
    if text == "":
        return None
    if column in JSON_COLUMNS:
        return json.loads(text)
    if column in INT_COLUMNS:
        return int(float(text))
    if column in BOOL_COLUMNS and text in ("True", "False"):
        return text == "True"
    return text


def safe_name(text: str) -> str:
    """``text`` usable as one file or folder name: separators become ``_``, no hidden/empty names."""
    name = str(text)
    for character in UNSAFE_CHARACTERS:
        name = name.replace(character, "_")
    if name in ("", ".", ".."):
        name = name.replace(".", "_") or "_"
    if name.startswith(".") or name.startswith("__"):
        name = "x" + name
    return name


def write_imagefolder(rows: list[Row], out_dir: Path) -> list[Row]:
    """Put each row's image at ``<out_dir>/<split>/<class_name>/<image_id><ext>`` and write the metadata.

    Images are hard-linked when source and destination share a file system, else copied. Each split folder
    gets a ``metadata.csv`` (:func:`write_metadata_csv`); all splits have the same columns.

    Args:
        rows: manifest rows (``image_id``, ``path``, ``class_name``, ``split`` at least).
        out_dir: output folder (created; existing files at the same names are replaced).

    Returns:
        Copies of the rows, in order, with ``path`` pointing at the new file.

    Raises:
        ValueError: two rows map to the same file (their ids or class names differ only in separators).
        FileNotFoundError: a row's image does not exist.
    """
    out_dir = Path(os.path.abspath(out_dir))
    written: dict[Path, str] = {}
    new_rows: list[Row] = []
    for row in rows:
        source = Path(row["path"])
        file_name = safe_name(row["image_id"]) + source.suffix.lower()
        target = out_dir / row["split"] / safe_name(row["class_name"]) / file_name
        if target in written:
            raise ValueError(
                f"rows {written[target]!r} and {row['image_id']!r} would both be written to {str(target)!r}"
            )
        written[target] = row["image_id"]
        _link_or_copy(source, target)
        new_rows.append({**row, "path": str(target)})
    metadata_rows = _same_types_in_every_split(new_rows)
    for split in sorted({row["split"] for row in new_rows}):
        write_metadata_csv([r for r in metadata_rows if r["split"] == split], out_dir / split)
    logger.info("wrote %d images to %s", len(new_rows), out_dir)
    return new_rows


def _same_types_in_every_split(rows: list[Row]) -> list[Row]:
    """Rows prepared so that ``datasets`` infers the same column types from every split's metadata.csv.

    ``datasets`` reads each metadata.csv with pandas and refuses splits whose inferred types differ. So every
    row gets every column; columns that are ``None`` in all rows are left out; integer columns with a
    missing value (ints, or strings of digits) are written as floats (``2.0``; :func:`decode_metadata_value`
    reads ``label``/``group`` back as ints, other such columns come back as ``"2.0"``),
    since pandas reads an integer column with an empty cell as float. A column empty in a whole split but
    set in another would still be read as float there and string elsewhere: that is logged as a warning.
    """
    columns = sorted({key for row in rows for key in row if row[key] is not None} | {"split"})
    filled = [{column: row.get(column) for column in columns} for row in rows]
    for column in columns:
        values = [row[column] for row in filled]
        set_values = [v for v in values if v is not None]
        if len(set_values) < len(values) and all(_integral(v) for v in set_values):
            for row in filled:
                if row[column] is not None:
                    row[column] = float(row[column])
        empty_splits = {r["split"] for r in filled} - {r["split"] for r in filled if r[column] is not None}
        if empty_splits:
            logger.warning(
                "column %r is empty in split(s) %s but not in others: datasets.load_dataset may refuse the "
                "metadata.csv files (different column types)", column, sorted(empty_splits),
            )
    return filled


def _integral(value: Any) -> bool:
    """An int, or a string pandas reads as one (``"1"``, as readers keep extra columns such as ``place``)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target``, or copy it when linking is not possible (other file system)."""
    if not source.is_file():
        raise FileNotFoundError(f"image {str(source)!r} does not exist")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        if target.samefile(source):
            return
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
