"""Source images with object boxes for the Hard-Spurious-ImageNet compositor: an ImageNet-style tree, or any
manifest whose rows carry boxes (the synthetic benchmark).

ImageNet layout (the ILSVRC / Kaggle "ImageNet Object Localization" one), under ``root``:

- images: ``[Data/CLS-LOC/]train/<wnid>/<wnid>_<n>.JPEG`` and ``[Data/CLS-LOC/]val/<image>.JPEG`` (flat; the
  class comes from the boxes) or ``val/<wnid>/<image>.JPEG``;
- boxes, PASCAL VOC XML: ``Annotations/CLS-LOC/<split>/[<wnid>/]<image>.xml`` with ``size/{width,height}`` and
  ``object/{name, bndbox/{xmin,ymin,xmax,ymax}}``; or CSV: ``LOC_<split>_solution.csv`` with
  ``ImageId,PredictionString`` where the string repeats ``wnid xmin ymin xmax ymax``;
- class names: ``LOC_synset_mapping.txt`` (``<wnid> <name>[, <synonym>...]`` per line), optional.

Every source row: ``image_id``, ``path``, ``pool`` ("train" or "val": the ImageNet split it comes from),
``wnid``, ``class_name``, ``label``, ``width``, ``height`` and ``boxes`` (``[[x0, y0, x1, y1], ...]``, pixels,
the boxes of the row's own class only). Images without a box of their class cannot be composed; they are
counted, not listed. Unreadable annotations are quarantined with the file and the reason.
"""

from __future__ import annotations

import csv
import logging
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from aspire.manifest import Row

log = logging.getLogger(__name__)

POOLS = ("train", "val")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


class SourceError(ValueError):
    """The source tree does not match the layout; the message names the file or folder."""


@dataclass
class Sources:
    """What :func:`read_imagenet` and :func:`read_manifest_sources` return.

    Attributes:
        rows: source rows with boxes, sorted by (pool, wnid, image_id).
        quarantine: ``{image_id, path, reason}`` for unreadable annotations or images.
        without_box: per wnid, how many images had no box of their class (not composable).
    """

    rows: list[Row]
    quarantine: list[Row] = field(default_factory=list)
    without_box: dict[str, int] = field(default_factory=dict)


def read_synset_names(path: Path) -> dict[str, str]:
    """``{wnid: first name}`` from ``LOC_synset_mapping.txt``; empty when the file does not exist."""
    if not path.is_file():
        return {}
    names = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, rest = line.strip().partition(" ")
        if not wnid.startswith("n") or not rest:
            raise SourceError(f"{path}:{number}: expected '<wnid> <name>', got {line!r}")
        names[wnid] = rest.split(",")[0].strip()
    return names


def resolve_classes(wanted: list[str] | None, available: list[str], names: dict[str, str], where: str) -> list[str]:
    """wnids of ``wanted`` (each a wnid or a class name of the synset mapping), or all ``available``.

    Raises:
        SourceError: a wanted class is not in the tree (named, with ``where``).
    """
    if not wanted:
        return sorted(available)
    by_name = {name.lower(): wnid for wnid, name in names.items()}
    out = []
    for item in wanted:
        wnid = item if item in available else by_name.get(item.lower())
        if wnid is None or wnid not in available:
            raise SourceError(f"{where}: class {item!r} is not in the source tree ({len(available)} classes there)")
        out.append(wnid)
    return list(dict.fromkeys(out))


def parse_voc(path: Path) -> tuple[int, int, list[tuple[str, list[float]]]]:
    """(width, height, [(wnid, [x0, y0, x1, y1]), ...]) of one PASCAL VOC XML file.

    Raises:
        SourceError: unparsable XML or a missing / non-numeric field (named).
    """
    try:
        root = ET.parse(path).getroot()
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
        objects = []
        for obj in root.iter("object"):
            box = obj.find("bndbox")
            objects.append((obj.findtext("name").strip(), [float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]))
    except (ET.ParseError, TypeError, ValueError, AttributeError) as exc:
        raise SourceError(f"{path}: not a PASCAL VOC annotation with size/width, size/height and "
                          f"object/bndbox/xmin..ymax ({type(exc).__name__}: {exc})") from exc
    return width, height, objects


def parse_loc_csv(path: Path) -> dict[str, list[tuple[str, list[float]]]]:
    """``{image id: [(wnid, [x0, y0, x1, y1]), ...]}`` from ``LOC_<split>_solution.csv``.

    Raises:
        SourceError: missing columns or a PredictionString that is not groups of ``wnid x0 y0 x1 y1``.
    """
    out: dict[str, list[tuple[str, list[float]]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or []):
            raise SourceError(f"{path}: expected columns ImageId,PredictionString, got {reader.fieldnames}")
        for number, record in enumerate(reader, 2):
            tokens = record["PredictionString"].split()
            if len(tokens) % 5:
                raise SourceError(f"{path}:{number}: PredictionString must repeat 'wnid xmin ymin xmax ymax', "
                                  f"got {len(tokens)} tokens")
            try:
                boxes = [(tokens[i], [float(t) for t in tokens[i + 1 : i + 5]]) for i in range(0, len(tokens), 5)]
            except ValueError as exc:
                raise SourceError(f"{path}:{number}: PredictionString: {exc}") from exc
            out.setdefault(record["ImageId"], []).extend(boxes)
    return out


def clamp_boxes(boxes: list[list[float]], width: int, height: int) -> list[list[float]]:
    """Boxes clipped to the image; empty ones dropped."""
    out = []
    for x0, y0, x1, y1 in boxes:
        x0, x1 = max(0.0, min(x0, x1)), min(float(width), max(x0, x1))
        y0, y1 = max(0.0, min(y0, y1)), min(float(height), max(y0, y1))
        if x1 - x0 >= 1 and y1 - y0 >= 1:
            out.append([x0, y0, x1, y1])
    return out


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_root(root: Path) -> Path:
    """``root/Data/CLS-LOC`` when it exists (Kaggle layout), else ``root``."""
    nested = root / "Data" / "CLS-LOC"
    return nested if nested.is_dir() else root


def list_pool(root: Path, pool: str) -> list[tuple[Path, str | None]]:
    """(image path, wnid from its folder or ``None`` for a flat val folder) of one ImageNet split."""
    folder = image_root(root) / pool
    if not folder.is_dir():
        raise SourceError(f"{folder}: no such folder (expected {pool}/<wnid>/*.JPEG or {pool}/*.JPEG under {root})")
    out = [(path, None) for path in _images(folder)]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        out += [(path, sub.name) for path in _images(sub)]
    return out


def read_imagenet(root: Path, boxes: str = "auto", classes: list[str] | None = None) -> Sources:
    """Source rows of an ImageNet-style tree (module docstring), for the wanted classes.

    Args:
        root: the tree's root.
        boxes: ``voc`` (XML), ``csv`` (LOC_*_solution.csv) or ``auto`` (voc when ``Annotations/CLS-LOC`` exists).
        classes: wnids or synset names; ``None``: every class of ``train/``.

    Raises:
        SourceError: layout errors (missing folder, unknown class, missing CSV), naming the path.
    """
    root = Path(root)
    if boxes == "auto":
        boxes = "voc" if (root / "Annotations" / "CLS-LOC").is_dir() else "csv"
    names = read_synset_names(root / "LOC_synset_mapping.txt")
    listings = {pool: list_pool(root, pool) for pool in POOLS}
    available = sorted({wnid for _, wnid in listings["train"] if wnid})
    wanted = set(resolve_classes(classes, available, names, str(root)))
    labels = {wnid: i for i, wnid in enumerate(sorted(wanted))}
    out = Sources([])
    without: Counter = Counter()
    for pool, listing in listings.items():
        table = None
        if boxes == "csv":
            csv_path = root / f"LOC_{pool}_solution.csv"
            if not csv_path.is_file():
                raise SourceError(f"{csv_path}: missing (boxes: csv needs LOC_train_solution.csv and LOC_val_solution.csv)")
            table = parse_loc_csv(csv_path)
        for path, folder_wnid in listing:
            if folder_wnid is not None and folder_wnid not in wanted:
                continue
            image_id = path.stem
            try:
                if table is not None:
                    objects = table.get(image_id, [])
                    width, height = Image.open(path).size if objects else (0, 0)
                else:
                    xml = root / "Annotations" / "CLS-LOC" / pool / (folder_wnid or "") / f"{image_id}.xml"
                    if not xml.is_file():
                        xml = root / "Annotations" / "CLS-LOC" / pool / f"{image_id}.xml"
                    width, height, objects = parse_voc(xml) if xml.is_file() else (0, 0, [])
            except SourceError as exc:
                out.quarantine.append({"image_id": image_id, "path": str(path), "reason": str(exc)})
                continue
            except OSError as exc:
                out.quarantine.append({"image_id": image_id, "path": str(path), "reason": f"unreadable image: {exc}"})
                continue
            wnid = folder_wnid or (objects[0][0] if objects else None)
            if wnid is None or wnid not in wanted:
                if wnid is None and folder_wnid is None:
                    without["<unlabelled val image>"] += 1
                continue
            mine = clamp_boxes([b for name, b in objects if name == wnid], width, height)
            if not mine:
                without[wnid] += 1
                continue
            out.rows.append({"image_id": image_id, "path": str(path.resolve()), "pool": pool, "wnid": wnid,
                             "class_name": names.get(wnid, wnid), "label": labels[wnid], "width": width,
                             "height": height, "boxes": mine})
    out.rows.sort(key=lambda r: (r["pool"], r["wnid"], r["image_id"]))
    out.without_box = dict(sorted(without.items()))
    log.info("imagenet %s: %d images with boxes in %d classes, %d without, %d quarantined", root, len(out.rows),
             len(wanted), sum(without.values()), len(out.quarantine))
    return out


MANIFEST_POOLS = {"train": "train", "val": "train", "test": "val"}
"""Manifest splits -> compositor pools: train and val images feed the train/val compositions, test the test ones."""


def read_manifest_sources(rows: list[Row], classes: list[str] | None = None) -> Sources:
    """Source rows from manifest rows whose ``boxes`` column lists ``{"phrase", "box"}`` (the synthetic
    benchmark, or any dataset written with boxes); the class's boxes are those whose phrase is its class name."""
    available = sorted({r["class_name"] for r in rows})
    wanted = set(resolve_classes(classes, available, {}, "dataset"))
    labels = {name: i for i, name in enumerate(sorted(wanted))}
    out = Sources([])
    without: Counter = Counter()
    for row in rows:
        if row["class_name"] not in wanted:
            continue
        try:
            width, height = Image.open(row["path"]).size
        except OSError as exc:
            out.quarantine.append({"image_id": row["image_id"], "path": row["path"], "reason": f"unreadable image: {exc}"})
            continue
        mine = clamp_boxes([list(map(float, b["box"])) for b in row.get("boxes") or []
                            if b.get("phrase") == row["class_name"]], width, height)
        if not mine:
            without[row["class_name"]] += 1
            continue
        out.rows.append({"image_id": row["image_id"], "path": row["path"], "pool": MANIFEST_POOLS[row["split"]],
                         "wnid": row["class_name"], "class_name": row["class_name"], "label": labels[row["class_name"]],
                         "width": width, "height": height, "boxes": mine})
    out.rows.sort(key=lambda r: (r["pool"], r["wnid"], r["image_id"]))
    out.without_box = dict(sorted(without.items()))
    return out
