"""Dataset readers: turn a dataset folder into manifest rows (see :mod:`aspire.manifest`).

:func:`read_dataset` dispatches on ``config.format``; there is one small reader per format:

- ``imagefolder``: ``<root>/<class>/<image>`` (split deterministically by ``config.seed``: ``val_fraction`` of
  each class to val and as much to test) or ``<root>/<split>/<class>/<image>``.
- ``hf-imagefolder``: the Hugging Face ``imagefolder`` layout of :mod:`aspire.imagefolder`:
  ``<root>/<split>/metadata.csv|metadata.jsonl``, or one metadata file at the root with a ``split`` column.
- ``waterbirds``: ``<root>/metadata.csv`` (``img_id, img_filename, y, split, place``).
- ``celeba``: ``list_attr_celeba.txt|csv`` + ``list_eval_partition.txt|csv``, images in ``img_align_celeba/``.
- ``spuco``: ``<root>/<split>/<class>/<spurious>/<image>``.

Every row has ``image_id``, ``path`` (absolute), ``label``, ``class_name``, ``split`` (train/val/test),
``group`` (int or ``None``) and ``source="original"``, plus format-specific extra columns. Readers do not
check that the image files exist: :func:`aspire.images.check_images` quarantines the missing ones.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from aspire.imagefolder import decode_metadata_value, safe_name
from aspire.manifest import Row

if TYPE_CHECKING:
    from aspire.config import DatasetConfig

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
NUMBERED_SPLITS = {0: "train", 1: "val", 2: "test"}
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
WATERBIRDS_CLASSES = ("landbird", "waterbird")


class DatasetError(ValueError):
    """The dataset on disk does not match its format; the message names the file, column and value."""


def read_dataset(config: "DatasetConfig") -> list[Row]:
    """Read a dataset into manifest rows.

    Args:
        config: any object with ``format``, ``root``, ``target_attr``, ``spurious_attr``, ``val_fraction``
            and ``seed`` (normally a :class:`aspire.config.DatasetConfig`).

    Returns:
        One row per image, with unique ``image_id``; labels numbered in the sorted order of the class folder
        names, as torchvision ``ImageFolder`` and ``datasets`` number them (:func:`labels_in_folder_order`).

    Raises:
        DatasetError: unknown format, missing root or metadata file, missing column or bad value.
    """
    readers: dict[str, Callable[[Any], list[Row]]] = {
        "imagefolder": read_imagefolder,
        "hf-imagefolder": read_hf_imagefolder,
        "waterbirds": read_waterbirds,
        "celeba": read_celeba,
        "spuco": read_spuco,
    }
    if config.format not in readers:
        raise DatasetError(f"unknown dataset format {config.format!r}; expected one of {sorted(readers)}")
    rows = labels_in_folder_order(readers[config.format](config))
    _check_unique_ids(rows, Path(config.root))
    logger.info("read %d images (%s) from %s", len(rows), config.format, config.root)
    return rows


# ---------------------------------------------------------------------------------------------- helpers



def labels_in_folder_order(rows: list[Row]) -> list[Row]:
    """Rows with ``label`` = the class's position among the sorted class folder names.

    The export writes one folder per class (:func:`aspire.imagefolder.safe_name` of its name), and torchvision
    ``ImageFolder`` and ``datasets.load_dataset("imagefolder")`` number classes by sorting those folder names;
    the manifest, the checkpoint's ``class_names`` and every export use that same order. A reader whose own
    labels differ has its rows renumbered, the original kept as ``dataset_label``: Waterbirds' ``y`` agrees
    (landbird 0, waterbird 1); CelebA's does not (``Blond_Hair`` sorts before ``not_Blond_Hair``, so the target
    attribute is label 0 here and ``dataset_label`` keeps the paper's 1), nor may a synthetic benchmark's spec
    order or a metadata ``label`` column. Group ids are left as the reader made them.

    Raises:
        DatasetError: one label carries two class names, or two class names share one folder name.
    """
    names: dict[int, str] = {}
    for row in rows:
        known = names.setdefault(row["label"], row["class_name"])
        if known != row["class_name"]:
            raise DatasetError(f"label {row['label']} is named both {known!r} and {row['class_name']!r}")
    folders: dict[str, str] = {}
    for name in names.values():
        other = folders.setdefault(safe_name(name), name)
        if other != name:
            raise DatasetError(f"classes {other!r} and {name!r} would share the folder {safe_name(name)!r}")
    order = {name: i for i, name in enumerate(sorted(set(names.values()), key=safe_name))}
    if all(order[name] == label for label, name in names.items()):
        return rows
    logger.info("labels renumbered in class-folder order (as ImageFolder and datasets number them): %s",
                ", ".join(f"{name} {label}->{order[name]}" for label, name in sorted(names.items())))
    return [{**row, "label": order[row["class_name"]], "dataset_label": row["label"]} for row in rows]

def _root(config: Any) -> Path:
    root = Path(os.path.abspath(Path(config.root).expanduser()))
    if not root.is_dir():
        raise DatasetError(f"dataset root {str(root)!r} ({config.format}) does not exist or is not a folder")
    return root


def _make_row(
    image_id: str, path: Path | str, label: int, class_name: str, split: str, group: int | None, **extras: Any
) -> Row:
    row: Row = {
        "image_id": image_id,
        "path": str(path),
        "label": label,
        "class_name": class_name,
        "split": split,
        "group": group,
        "source": "original",
    }
    row.update(extras)
    return row


def _check_unique_ids(rows: list[Row], where: Path | list[str]) -> None:
    """Every ``image_id`` once; ``where`` is the dataset root or, per row, the file and line it came from.

    Raises:
        DatasetError: naming both places of the first repeated id.
    """
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        j = first.setdefault(row["image_id"], i)
        if j != i:
            if isinstance(where, list):
                raise DatasetError(f"{where[i]}: image_id {row['image_id']!r} was already used at {where[j]} "
                                   "(ids must be unique across all splits)")
            raise DatasetError(f"{where}: image_id {row['image_id']!r} appears twice")


def _subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files (by extension) in ``folder``, sorted; hidden files skipped."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p for p in found
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _split_dirs(root: Path) -> dict[str, Path]:
    """Sub-folders of ``root`` named like a split (``train``, ``val``/``valid``/``validation``, ``test``).

    Raises:
        DatasetError: two folders name the same split (e.g. ``val`` and ``valid``).
    """
    found: dict[str, Path] = {}
    for folder in _subdirs(root):
        split = SPLIT_ALIASES.get(folder.name.lower())
        if split is None:
            continue
        if split in found:
            raise DatasetError(f"{root}: folders {found[split].name!r} and {folder.name!r} are both the {split} split")
        found[split] = folder
    return found


def _image_id(path: Path, base: Path, seen: set[str]) -> str:
    """``path`` relative to ``base`` without extension (with it when two files share a stem)."""
    relative = path.relative_to(base)
    image_id = relative.with_suffix("").as_posix()
    if image_id in seen:
        image_id = relative.as_posix()
    seen.add(image_id)
    return image_id


def _parse_int(text: Any, where: str, column: str) -> int:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: column {column!r} has value {text!r}, expected an integer") from None


def _parse_split(value: Any, where: str, column: str = "split") -> str:
    """Split name from a name (aliases allowed) or a number 0/1/2."""
    text = str(value).strip().lower()
    if text in SPLIT_ALIASES:
        return SPLIT_ALIASES[text]
    if text in ("0", "1", "2"):
        return NUMBERED_SPLITS[int(text)]
    raise DatasetError(f"{where}: column {column!r} has value {value!r}, expected train/val/test or 0/1/2")


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a CSV file with a header (UTF-8, with or without a byte-order mark), checking that the
    ``required`` columns are present; a row with fewer cells than the header is an error naming its line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            if len(columns) == 1 and required and required[0] not in columns:
                for other in (";", "\t", "|"):
                    if other in columns[0]:
                        raise DatasetError(f"{path}: one column {columns[0]!r}: the delimiter looks like {other!r}; "
                                           "metadata CSV files are comma-separated")
            _require_columns(path, columns, required)
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8 "
                           "(e.g. iconv -f latin1 -t utf-8)") from None
    for line, row in enumerate(rows, start=2):
        short = [c for c, v in row.items() if v is None]
        if short:
            raise DatasetError(f"{path} line {line}: fewer cells than columns in the header (no {', '.join(map(repr, short))})")
    return rows


def _require_columns(path: Path, columns: list[str], required: tuple[str, ...]) -> None:
    for column in required:
        if column not in columns:
            raise DatasetError(f"{path}: missing column {column!r} (columns: {columns})")


def _find_file(root: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"{root}: none of the files {list(names)} exists")


# ---------------------------------------------------------------------------------------------- imagefolder


def read_imagefolder(config: Any) -> list[Row]:
    """``<root>/<class>/<image>`` or ``<root>/<split>/<class>/<image>``; classes sorted give the labels.

    Raises:
        DatasetError: missing root or no class folder.
    """
    root = _root(config)
    split_dirs = _split_dirs(root)
    if split_dirs:
        class_names = sorted({c.name for folder in split_dirs.values() for c in _subdirs(folder)})
        if not class_names:
            raise DatasetError(f"{root}: split folders have no class sub-folders")
        rows: list[Row] = []
        seen: set[str] = set()
        for split, folder in sorted(split_dirs.items()):
            for class_dir in _subdirs(folder):
                label = class_names.index(class_dir.name)
                for path in _images_in(class_dir):
                    rows.append(_make_row(_image_id(path, root, seen), path, label, class_dir.name, split, None))
        return rows
    class_dirs = _subdirs(root)
    if not class_dirs:
        raise DatasetError(f"{root}: no class sub-folders (expected <root>/<class>/<image>)")
    rows = []
    seen = set()
    for label, class_dir in enumerate(class_dirs):
        paths = _images_in(class_dir)
        splits = _random_splits(len(paths), config.val_fraction, f"{config.seed}:{class_dir.name}")
        for path, split in zip(paths, splits):
            rows.append(_make_row(_image_id(path, root, seen), path, label, class_dir.name, split, None))
    return rows


def _random_splits(n: int, val_fraction: float, seed: str) -> list[str]:
    """``n`` split names: ``floor(n * val_fraction)`` val, as many test, the rest train, shuffled by ``seed``."""
    n_val = int(n * val_fraction)
    n_test = min(n_val, n - n_val)
    splits = ["val"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test)
    random.Random(seed).shuffle(splits)
    return splits


# ---------------------------------------------------------------------------------------------- hf-imagefolder


def read_hf_imagefolder(config: Any) -> list[Row]:
    """``<root>/<split>/metadata.csv|jsonl|parquet`` or the same at ``<root>`` with a ``split`` column.

    ``file_name`` is relative to the metadata file's folder. The label is the ``label`` column when present,
    else the index of the class (``class_name`` column, else the image's parent folder) among the sorted
    class names. Other columns are kept (CSV values decoded with :func:`decode_metadata_value`).

    Raises:
        DatasetError: no metadata file, a missing ``file_name``/``split`` column or a bad value.
    """
    root = _root(config)
    records: list[tuple[Path, int, str, Row]] = []  # (metadata file, line, split, record)
    split_metas = {split: _metadata_file(folder) for split, folder in sorted(_split_dirs(root).items())}
    for split, meta in split_metas.items():
        if meta is not None:
            records += [(meta, line, split, r) for line, r in _read_metadata(meta)]
    if not any(split_metas.values()):
        meta = _metadata_file(root)
        if meta is None:
            raise DatasetError(
                f"{root}: no metadata file (looked for <split>/{{{','.join(METADATA_FILES)}}} and the same at the root)"
            )
        numbered = _read_metadata(meta)
        if numbered and "split" not in numbered[0][1]:
            raise DatasetError(f"{meta}: missing column 'split' (needed for a metadata file at the dataset root)")
        records = [(meta, line, _parse_split(r.get("split"), f"{meta} line {line}"), r) for line, r in numbered]
    return _hf_rows(records, root)


def _metadata_file(folder: Path) -> Path | None:
    for name in METADATA_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def _read_metadata(path: Path) -> list[tuple[int, Row]]:
    """(line number, record) of a metadata file, values typed (CSV decoded with :func:`decode_metadata_value`).

    Raises:
        DatasetError: invalid JSON, or no ``file_name`` column.
    """
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise DatasetError(f"{path}: not a readable Parquet file: {exc}") from None
        _require_columns(path, table.column_names, ("file_name",))
        return [(line, record) for line, record in enumerate(table.to_pylist(), start=1)]
    if path.suffix == ".jsonl":
        numbered: list[tuple[int, Row]] = []
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if text.strip():
                    numbered.append((line, _parse_json_record(text, f"{path} line {line}")))
        _require_columns(path, sorted({k for _, r in numbered for k in r}), ("file_name",))
        return numbered
    raw = _read_csv(path, ("file_name",))
    return [(line, _decode_record(r, f"{path} line {line}")) for line, r in enumerate(raw, start=2)]


def _parse_json_record(text: str, where: str) -> Row:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _decode_record(record: dict[str, str], where: str) -> Row:
    """Decode the CSV cells of one record; cells beyond the header are an error."""
    if None in record:
        raise DatasetError(f"{where}: more cells than columns in the header")
    decoded: Row = {}
    for column, text in record.items():
        try:
            decoded[column] = decode_metadata_value(column, text or "")
        except ValueError as exc:
            raise DatasetError(f"{where}: column {column!r} has value {text!r} that cannot be decoded: {exc}") from None
    return decoded


HF_CORE_COLUMNS = ("file_name", "image_id", "label", "class_name", "split", "group")


def _hf_rows(records: list[tuple[Path, int, str, Row]], root: Path) -> list[Row]:
    """Manifest rows from metadata records (file, line, split, record) of the dataset at ``root``."""
    labelled = [r.get("label") is not None for _, _, _, r in records]
    has_label = all(labelled)
    if any(labelled) and not has_label:  # one empty cell must not drop the label column of the whole dataset
        meta, line, _, _ = records[labelled.index(False)]
        raise DatasetError(f"{meta} line {line}: the 'label' cell is empty while other rows have one")
    class_of = [_hf_class_name(r) for _, _, _, r in records]
    class_names = sorted({c for c in class_of if c is not None})
    rows: list[Row] = []
    for (meta, line, split, record), class_name in zip(records, class_of):
        where = f"{meta} line {line}"
        if has_label:
            label = _parse_int(record["label"], where, "label")
            class_name = class_name if class_name is not None else str(label)
        elif class_name is None:
            raise DatasetError(f"{where}: no 'label' or 'class_name' column and the image is not in a class folder")
        else:
            label = class_names.index(class_name)
        rows.append(_hf_row(meta, where, split, record, label, class_name, root))
    places = [f"{meta} line {line}" for meta, line, _, _ in records]
    if has_label:
        _check_labels(rows, places)
    _check_unique_ids(rows, places)
    return rows


def _check_labels(rows: list[Row], where: list[str]) -> None:
    """Labels are 0..K-1 for K class names, and each label has one class name (and each name one label).

    Raises:
        DatasetError: naming the first row that breaks it and the row it disagrees with.
    """
    k = len({row["class_name"] for row in rows})
    for row, at in zip(rows, where):
        if not 0 <= row["label"] < k:
            raise DatasetError(f"{at}: label {row['label']} is out of range: {k} classes, labels 0..{k - 1}")
    name_at: dict[int, int] = {}
    label_at: dict[str, int] = {}
    for i, (row, at) in enumerate(zip(rows, where)):
        label, name = row["label"], row["class_name"]
        j = name_at.setdefault(label, i)
        if rows[j]["class_name"] != name:
            raise DatasetError(f"{at}: label {label} with class {name!r}, but label {label} is class "
                               f"{rows[j]['class_name']!r} at {where[j]}")
        j = label_at.setdefault(name, i)
        if rows[j]["label"] != label:
            raise DatasetError(f"{at}: label {label} with class {name!r}, but class {name!r} has label "
                               f"{rows[j]['label']} at {where[j]}")


def _hf_row(meta: Path, where: str, split: str, record: Row, label: int, class_name: str, root: Path) -> Row:
    """One manifest row from a metadata record; columns other than the core ones are kept as they are."""
    file_name = str(record.get("file_name") or "")
    if not file_name:
        raise DatasetError(f"{where}: column 'file_name' is empty")
    path = os.path.abspath(os.path.join(meta.parent, file_name))  # strings, not Paths: 200k rows list in seconds
    if not (path + os.sep).startswith(os.path.join(root, "")):
        raise DatasetError(f"{where}: file_name {file_name!r} is outside the dataset root {root}")
    image_id = record.get("image_id")
    image_id = str(image_id) if image_id is not None else f"{split}/{Path(file_name).with_suffix('').as_posix()}"
    group = None if record.get("group") is None else _parse_int(record["group"], where, "group")
    row = _make_row(image_id, path, label, class_name, split, group)
    row.update({k: v for k, v in record.items() if k not in HF_CORE_COLUMNS})
    if row.get("source") is None:
        row["source"] = "original"
    return row


def _hf_class_name(record: Row) -> str | None:
    """``class_name`` column, else the image's parent folder when it is below the metadata folder."""
    if record.get("class_name") is not None:
        return str(record["class_name"])
    parent = Path(str(record.get("file_name") or "")).parent
    return parent.name if parent.name else None


# ---------------------------------------------------------------------------------------------- waterbirds


def read_waterbirds(config: Any) -> list[Row]:
    """``<root>/metadata.csv``: ``img_id, img_filename, y, split (0/1/2), place``; group = ``2*y + place``.

    Raises:
        DatasetError: missing metadata file or column, or a bad value.
    """
    root = _root(config)
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise DatasetError(f"{meta}: Waterbirds metadata file does not exist")
    rows: list[Row] = []
    places: list[str] = []
    for i, record in enumerate(_read_csv(meta, ("img_id", "img_filename", "y", "split", "place")), start=2):
        where = f"{meta} line {i}"
        places.append(where)
        y = _parse_int(record["y"], where, "y")
        place = _parse_int(record["place"], where, "place")
        if y not in (0, 1) or place not in (0, 1):
            raise DatasetError(f"{where}: y={record['y']!r}, place={record['place']!r}; expected 0 or 1")
        split = NUMBERED_SPLITS.get(_parse_int(record["split"], where, "split"))
        if split is None:
            raise DatasetError(f"{where}: column 'split' has value {record['split']!r}, expected 0, 1 or 2")
        path = root / record["img_filename"]
        rows.append(_make_row(str(record["img_id"]), path, y, WATERBIRDS_CLASSES[y], split, 2 * y + place, place=place))
    _check_unique_ids(rows, places)
    return rows


# ---------------------------------------------------------------------------------------------- celeba


def read_celeba(config: Any) -> list[Row]:
    """CelebA: label = ``config.target_attr`` (-1/1 -> 0/1), group = ``2*label + spurious``.

    Raises:
        DatasetError: missing attribute/partition file, an attribute not in the header, an image without a
            partition, or a bad value.
    """
    root = _root(config)
    attr_file = _find_file(root, ("list_attr_celeba.txt", "list_attr_celeba.csv"))
    part_file = _find_file(root, ("list_eval_partition.txt", "list_eval_partition.csv"))
    names, attrs = _read_celeba_attrs(attr_file)
    for attr in (config.target_attr, config.spurious_attr):
        if attr not in names:
            raise DatasetError(f"{attr_file}: attribute {attr!r} is not in the header (attributes: {names})")
    partitions = _read_celeba_partitions(part_file)
    image_dir = root / "img_align_celeba" if (root / "img_align_celeba").is_dir() else root
    target, spurious = names.index(config.target_attr), names.index(config.spurious_attr)
    rows: list[Row] = []
    for filename, values in attrs:
        if filename not in partitions:
            raise DatasetError(f"{part_file}: no partition for image {filename!r} (listed in {attr_file.name})")
        label = _celeba_bit(values[target], attr_file, filename, config.target_attr)
        s = _celeba_bit(values[spurious], attr_file, filename, config.spurious_attr)
        class_name = config.target_attr if label else f"not_{config.target_attr}"
        rows.append(_make_row(
            Path(filename).stem, image_dir / filename, label, class_name, partitions[filename], 2 * label + s,
            **{config.spurious_attr: s},
        ))
    return rows


def _read_celeba_attrs(path: Path) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(attribute names, [(filename, values)]) from ``list_attr_celeba.txt`` or ``.csv``."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            table = [r for r in csv.reader(f) if r]
        if not table or table[0][0].strip() != "image_id":
            raise DatasetError(f"{path}: missing column 'image_id' (expected header image_id,attr1,...)")
        names = [c.strip() for c in table[0][1:]]
        body = [(r[0].strip(), [v.strip() for v in r[1:]]) for r in table[1:]]
    else:
        with open(path, encoding="utf-8") as f:
            lines = [line.split() for line in f if line.strip()]
        if len(lines) < 2:
            raise DatasetError(f"{path}: expected a count line and an attribute-name line")
        names = lines[1]
        body = [(parts[0], parts[1:]) for parts in lines[2:]]
    for filename, values in body:
        if len(values) != len(names):
            raise DatasetError(f"{path}: image {filename!r} has {len(values)} values for {len(names)} attributes")
    return names, body


def _read_celeba_partitions(path: Path) -> dict[str, str]:
    """filename -> split from ``list_eval_partition.txt`` (``filename 0|1|2``) or ``.csv``."""
    if path.suffix == ".csv":
        pairs = [(r["image_id"].strip(), r["partition"]) for r in _read_csv(path, ("image_id", "partition"))]
    else:
        with open(path, encoding="utf-8") as f:
            pairs = [tuple(line.split()[:2]) for line in f if line.strip()]
    partitions: dict[str, str] = {}
    for pair in pairs:
        if len(pair) != 2:
            raise DatasetError(f"{path}: line {pair!r} is not 'filename partition'")
        filename, value = pair
        split = NUMBERED_SPLITS.get(_parse_int(value, f"{path} ({filename})", "partition"))
        if split is None:
            raise DatasetError(f"{path}: image {filename!r} has partition {value!r}, expected 0, 1 or 2")
        partitions[filename] = split
    return partitions


def _celeba_bit(value: str, path: Path, filename: str, attr: str) -> int:
    """CelebA attribute value ``1`` -> 1, ``-1`` (or ``0``) -> 0."""
    if value == "1":
        return 1
    if value in ("-1", "0"):
        return 0
    raise DatasetError(f"{path}: image {filename!r} attribute {attr!r} has value {value!r}, expected -1 or 1")


# ---------------------------------------------------------------------------------------------- spuco


def read_spuco(config: Any) -> list[Row]:
    """``<root>/<split>/<class>/<spurious>/<image>``; group = ``label * n_spurious + spurious index``.

    Raises:
        DatasetError: missing root or no split folder.
    """
    root = _root(config)
    split_dirs = _split_dirs(root)
    if not split_dirs:
        raise DatasetError(f"{root}: no split folders (expected <root>/train|val|test/<class>/<spurious>/<image>)")
    class_dirs = [c for folder in split_dirs.values() for c in _subdirs(folder)]
    class_names = sorted({c.name for c in class_dirs})
    spurious_names = sorted({s.name for c in class_dirs for s in _subdirs(c)})
    rows: list[Row] = []
    seen: set[str] = set()
    for split, folder in sorted(split_dirs.items()):
        for class_dir in _subdirs(folder):
            label = class_names.index(class_dir.name)
            for spurious_dir in _subdirs(class_dir):
                s = spurious_names.index(spurious_dir.name)
                group = label * len(spurious_names) + s
                for path in _images_in(spurious_dir):
                    rows.append(_make_row(
                        _image_id(path, root, seen), path, label, class_dir.name, split, group,
                        spurious=spurious_dir.name,
                    ))
    return rows
