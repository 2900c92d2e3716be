"""The image-folder layout we write and read (Hugging Face ``imagefolder`` + torchvision ``ImageFolder``).

```
<root>/<split>/metadata.parquet          file_name (relative to <root>/<split>), image_id, label, class_name, ...
<root>/<split>/<class_name>/<file>       the images
```

``datasets.load_dataset("imagefolder", data_dir=root)`` (or ``load_dataset(root)``) reads it with one split per
folder and ``label`` as a ``ClassLabel``; ``torchvision.datasets.ImageFolder(root / split)`` sees one class per
sub-folder. Both number the classes by sorting the folder names, and so does the manifest
(:func:`aspire.readers.labels_in_folder_order`): label ``i`` is the same class in all three. Every split's
metadata has one Arrow schema (ints as int64, lists as lists, missing values as nulls), so ``datasets`` never
sees splits whose columns differ; ``pandas.read_parquet`` reads it too. (:func:`write_metadata_csv` writes the
CSV variant the synthetic benchmark uses, lists as JSON strings.)

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
from typing import TYPE_CHECKING, Any

from aspire.manifest import Row

if TYPE_CHECKING:
    import pyarrow as pa

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

    Images are hard-linked when source and destination share a file system, else copied; an image that other
    readers would decode differently (CMYK, 16-bit, palette, alpha, an EXIF orientation:
    :func:`aspire.images.needs_rgb_copy`) is written as the RGB PNG the pipeline saw instead. Each split folder
    gets a ``metadata.parquet`` (:func:`write_metadata_parquet`) with one schema for all splits.

    Args:
        rows: manifest rows (``image_id``, ``path``, ``label``, ``class_name``, ``split`` at least), labels in the
            sorted order of the class folder names (as :func:`aspire.readers.read_dataset` numbers them).
        out_dir: output folder (created; existing files at the same names are replaced).

    Returns:
        Copies of the rows, in order, with ``path`` pointing at the new file.

    Raises:
        ValueError: two rows map to the same file (their ids or class names differ only in separators), or
            the labels are not numbered in folder order (torchvision and ``datasets`` would number them otherwise).
        FileNotFoundError: a row's image does not exist.
    """
    from aspire.images import load_rgb, needs_rgb_copy

    out_dir = Path(os.path.abspath(out_dir))
    names = folder_class_names(rows)
    written: dict[Path, str] = {}
    new_rows: list[Row] = []
    for row in rows:
        source = Path(row["path"])
        as_rgb = source.is_file() and needs_rgb_copy(source)
        file_name = safe_name(row["image_id"]) + (".png" if as_rgb else source.suffix.lower())
        target = out_dir / row["split"] / safe_name(row["class_name"]) / file_name
        if target in written:
            raise ValueError(
                f"rows {written[target]!r} and {row['image_id']!r} would both be written to {str(target)!r}"
            )
        written[target] = row["image_id"]
        if as_rgb:
            target.parent.mkdir(parents=True, exist_ok=True)
            load_rgb(source).save(target)
        else:
            _link_or_copy(source, target)
        new_rows.append({**row, "path": str(target)})
    for split in sorted({row["split"] for row in new_rows}):
        missing = sorted(set(names) - {row["class_name"] for row in new_rows if row["split"] == split})
        if missing:
            logger.warning("split %s has no image of class(es) %s: torchvision ImageFolder on %s alone numbers its "
                           "classes without them (use the label column, or datasets, whose ClassLabel has them all)",
                           split, missing, out_dir / split)
    schema = metadata_schema(new_rows, names)
    for split in sorted({row["split"] for row in new_rows}):
        write_metadata_parquet([r for r in new_rows if r["split"] == split], out_dir / split, schema)
    logger.info("wrote %d images to %s", len(new_rows), out_dir)
    return new_rows


def folder_class_names(rows: list[Row]) -> list[str]:
    """Class names by label, checked to be the sorted order of their folder names (torchvision's order).

    Raises:
        ValueError: a label carries two names, or label order and folder order differ.
    """
    names: dict[int, str] = {}
    for row in rows:
        if names.setdefault(row["label"], row["class_name"]) != row["class_name"]:
            raise ValueError(f"label {row['label']} is named both {names[row['label']]!r} and {row['class_name']!r}")
    by_label = [names[label] for label in sorted(names)]
    if sorted(names) != list(range(len(names))) or by_label != sorted(by_label, key=safe_name):
        raise ValueError(f"labels {dict(sorted(names.items()))} are not numbered 0.. in the sorted order of the class "
                         "folders, which torchvision ImageFolder and datasets would use (read rows with "
                         "aspire.readers.read_dataset, which numbers them so)")
    return by_label


def metadata_schema(rows: list[Row], class_names: list[str]) -> "pa.Schema":
    """One Arrow schema for every split's ``metadata.parquet``: ``file_name`` first, then each column any row
    sets (sorted), ``path`` left out; columns no row sets are left out.

    Types come from the values: ints -> int64, floats (or ints mixed with floats) -> float64, bools -> bool,
    strings -> string, lists and dicts -> Arrow's nested type for them (an all-empty list column becomes a list
    of strings); a column mixing other types is written as strings. Missing values are nulls. ``label`` carries
    the Hugging Face ``ClassLabel`` feature (names in label order) in the schema metadata, which
    ``datasets.load_dataset("imagefolder")`` reads.
    """
    import pyarrow as pa

    columns = sorted({key for row in rows for key, value in row.items() if value is not None}
                     - {"file_name", *SKIPPED_COLUMNS})
    fields = [pa.field("file_name", pa.string())]
    for column in columns:
        fields.append(pa.field(column, _arrow_type([row.get(column) for row in rows if row.get(column) is not None])))
    features = {"label": {"names": list(class_names), "_type": "ClassLabel"}}
    return pa.schema(fields, metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()})


def _arrow_type(values: list[Any]) -> "pa.DataType":
    import pyarrow as pa

    kinds = {type(v) for v in values}
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    if kinds == {str}:
        return pa.string()
    if kinds <= {list, dict}:
        try:
            return _no_null_leaves(pa.array(values).type)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
    return pa.string()


def _no_null_leaves(arrow_type: "pa.DataType") -> "pa.DataType":
    """``list<null>`` (every list empty) as ``list<string>``, recursively, so every split has a concrete type."""
    import pyarrow as pa

    if pa.types.is_null(arrow_type):
        return pa.string()
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return pa.list_(_no_null_leaves(arrow_type.value_type))
    if pa.types.is_struct(arrow_type):
        return pa.struct([pa.field(f.name, _no_null_leaves(f.type)) for f in arrow_type])
    return arrow_type


def write_metadata_parquet(rows: list[Row], split_dir: Path, schema: "pa.Schema") -> Path:
    """Write ``split_dir/metadata.parquet`` for rows whose ``path`` lies under ``split_dir``, with ``schema``.

    Raises:
        ValueError: a row's image is not inside ``split_dir``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    split_dir = Path(split_dir)
    records = []
    for row in rows:
        path = Path(row["path"])
        if not path.is_relative_to(split_dir):
            raise ValueError(f"image {str(path)!r} of row {row['image_id']!r} is not inside {str(split_dir)!r}")
        record = {"file_name": path.relative_to(split_dir).as_posix()}
        for field in schema:
            if field.name != "file_name":
                value = row.get(field.name)
                record[field.name] = _encode(value) if pa.types.is_string(field.type) and value is not None else value
        records.append(record)
    out = split_dir / "metadata.parquet"
    pq.write_table(pa.Table.from_pylist(records, schema=schema), out)
    return out


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
