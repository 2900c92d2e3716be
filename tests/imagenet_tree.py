"""A small ImageNet-style tree for the compositor's tests: train/<wnid>/*.JPEG, flat val/*.JPEG, boxes as PASCAL
VOC XML (Annotations/CLS-LOC) or as LOC_<split>_solution.csv, and LOC_synset_mapping.txt.

Each image is a noisy background in its class's colour with one or two solid rectangles (the objects, in the
class's object colour) whose boxes are annotated; so a test can find the object's pixels after composition.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = {  # wnid: (name, background colour, object colour)
    "n00000001": ("red fish", (40, 90, 160), (230, 30, 30)),
    "n00000002": ("green frog", (150, 120, 70), (30, 220, 40)),
    "n00000003": ("blue car", (90, 150, 60), (30, 40, 230)),
    "n00000004": ("snow sled", (235, 235, 240), (250, 200, 0)),
}


def _image(rng: np.random.Generator, wnid: str, two_objects: bool, scale: float) -> tuple[Image.Image, list[list[int]]]:
    _, background, colour = CLASSES[wnid]
    width, height = int(scale * rng.integers(70, 120)), int(scale * rng.integers(60, 100))
    pixels = np.clip(np.array(background) + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    boxes = []
    for _ in range(2 if two_objects else 1):
        w, h = int(rng.integers(15, width // 2)), int(rng.integers(15, height // 2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        pixels[y : y + h, x : x + w] = colour
        boxes.append([x, y, x + w, y + h])
    return Image.fromarray(pixels), boxes


def _voc(path: Path, width: int, height: int, objects: list[tuple[str, list[int]]]) -> None:
    items = "".join(f"<object><name>{wnid}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                    f"<ymax>{b[3]}</ymax></bndbox></object>" for wnid, b in objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
                    f"{items}</annotation>")


def make_tree(root: Path, boxes: str = "voc", train: int = 12, val: int = 4, unboxed: int = 2, seed: int = 0,
              classes: tuple[str, ...] = tuple(CLASSES), scale: float = 1.0) -> Path:
    """Write the tree. ``unboxed`` train images per class get no box (not composable, as in ImageNet); ``scale``
    multiplies the image sides (about 70-120 x 60-100 px; 4.5 gives ImageNet-like 315-540 x 270-450 px)."""
    rng = np.random.default_rng(seed)
    records: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    for wnid in classes:
        for i in range(train + unboxed + val):
            pool = "train" if i < train + unboxed else "val"
            image, image_boxes = _image(rng, wnid, two_objects=i % 5 == 0, scale=scale)
            if pool == "train":
                image_id = f"{wnid}_{i}"
                path = root / "train" / wnid / f"{image_id}.JPEG"
            else:
                image_id = f"ILSVRC2012_val_{wnid[-2:]}{i:04d}"
                path = root / "val" / f"{image_id}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, quality=95)
            if pool == "train" and i >= train:
                continue  # no annotation
            objects = [(wnid, b) for b in image_boxes]
            if boxes == "voc":
                folder = root / "Annotations" / "CLS-LOC" / pool / (wnid if pool == "train" else "")
                _voc(folder / f"{image_id}.xml", image.width, image.height, objects)
            records[pool].append((image_id, " ".join(f"{w} {b[0]} {b[1]} {b[2]} {b[3]}" for w, b in objects)))
    if boxes == "csv":
        for pool, rows in records.items():
            with open(root / f"LOC_{pool}_solution.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["ImageId", "PredictionString"])
                writer.writerows(rows)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {CLASSES[w][0]}, other name\n" for w in classes))
    return root
