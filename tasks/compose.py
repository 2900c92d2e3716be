"""The compositor's two sharded steps (Hard-Spurious-ImageNet, App. C and Sec. 4).

``backgrounds``: per source image, remove the class's objects (masks from ``remove.segment`` prompted by their
boxes: ``sam`` as the paper, Sec. 3.3 and App. C; ``box`` the boxes themselves), dilate the mask
(``remove.dilate``, 15 as in App. C), inpaint (the remove stage's ``lama`` or ``opencv`` backends), resize to
the canvas and save ``background.png``; crop the largest object (with its mask as alpha for
``compose.mask=segmenter``, the paper's SAM variant of App. E), at most canvas pixels on its shorter side, and
save ``object.png``. The step does not
depend on the object sizes or the plan, so changing them never re-inpaints.

``compose``: per planned composition, paste the object, resized, onto the background and save a JPEG. A shard
decodes each background and object once and reuses it for every composition in the shard (rows arrive sorted
by foreground image), resizes with OpenCV and encodes with libjpeg: this is what makes it faster than a plain
per-image PIL loop (``bench/compose_throughput.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE

from aspire.cache import ShardResult, StageStore
from aspire.compose import largest_box, paste
from aspire.config import ComposeRunConfig
from aspire.images import ImageError, load_rgb
from aspire.manifest import Row
from tasks.inpainters import inpainter_identity, load_inpainter
from tasks.segmenters import load_segmenter, segmenter_identity
from tasks.vision import box_mask, dilate

log = logging.getLogger(__name__)

BACKGROUND = "background.png"
OBJECT = "object.png"


def backgrounds_identity(config: ComposeRunConfig) -> dict:
    """Everything the backgrounds step's output depends on (its stage key), and nothing else."""
    remove = config.remove
    return {"mask": config.compose.mask, "segmenter": segmenter_identity(remove) if remove.segment != "box"
            else "box", "inpainter": inpainter_identity(remove), "dilate": remove.dilate, "max_side": remove.max_side,
            "canvas": config.compose.canvas}


def _scaled(image: Image.Image, boxes: list[list[float]], max_side: int) -> tuple[Image.Image, list[list[float]]]:
    """The image downscaled so its longer side is at most ``max_side``, with its boxes scaled alike."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image, boxes
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.BILINEAR), [[v * scale for v in box] for box in boxes]


def _object_crop(image: Image.Image, box: list[float], mask: np.ndarray | None, canvas: int) -> Image.Image:
    """The box's pixels (RGBA with the mask as alpha when given), downscaled to at most ``canvas`` px on the
    shorter side (the largest any composition needs)."""
    x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
    x1, y1 = max(x0 + 1, int(np.ceil(box[2]))), max(y0 + 1, int(np.ceil(box[3])))
    crop = np.asarray(image)[y0:y1, x0:x1]  # (h, w, 3)
    if mask is not None:
        crop = np.dstack([crop, mask[y0:y1, x0:x1].astype(np.uint8) * 255])  # (h, w, 4)
    scale = canvas / min(crop.shape[:2])
    if scale < 1:
        crop = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA)
    return Image.fromarray(crop)


def run_backgrounds(rows: list[Row], out: Path, config: ComposeRunConfig) -> ShardResult:
    """Backgrounds and object crops of one shard of source rows; unreadable images are quarantined."""
    remove, canvas = config.remove, config.compose.canvas
    segmenter = load_segmenter(remove) if remove.segment != "box" else None  # the inpainting masks
    inpainter = load_inpainter(remove)
    images, holes, kept, quarantine = [], [], [], []
    for row in rows:
        try:
            image, boxes = _scaled(load_rgb(row["path"]), row["boxes"], remove.max_side)
        except ImageError as exc:
            quarantine.append({"image_id": row["image_id"], "path": row["path"], "reason": exc.reason})
            continue
        largest = largest_box(boxes)
        if segmenter is not None:
            masks = segmenter.segment(image, boxes)  # one (H, W) bool per box
        else:
            masks = [box_mask(image.size, box) for box in boxes]
        core = masks[boxes.index(largest)] if config.compose.mask == "segmenter" else None  # the object's alpha
        hole = dilate(np.logical_or.reduce(masks), remove.dilate)
        folder = out / row["image_id"]
        folder.mkdir()
        _object_crop(image, largest, core, canvas).save(folder / OBJECT)
        images.append(image)
        holes.append(hole)
        kept.append({**row, "background_path": str(folder / BACKGROUND), "object_path": str(folder / OBJECT),
                     "hole_fraction": round(float(hole.mean()), 4)})
    for start in range(0, len(images), remove.batch_size):
        filled = inpainter.inpaint(images[start : start + remove.batch_size], holes[start : start + remove.batch_size])
        for row, image in zip(kept[start : start + remove.batch_size], filled):
            resized = cv2.resize(np.asarray(image), (canvas, canvas), interpolation=cv2.INTER_AREA)
            Image.fromarray(resized).save(row["background_path"])
    return ShardResult(kept, quarantine, {"prepared": len(kept)})


@task(name="compose-backgrounds", task_run_name="backgrounds-shard-{index}", cache_policy=NO_CACHE, tags=["gpu"])
def backgrounds_shard_task(store: StageStore, index: int, rows: list[Row], config: ComposeRunConfig) -> dict:
    """One shard of the backgrounds step (skipped when committed)."""
    return store.ensure_shard(index, rows, lambda shard, out: run_backgrounds(shard, out, config))


class ArrayCache:
    """Decoded images of one shard, by path, in OpenCV's BGR(A) order: each file is read once however many
    compositions use it, and is written back in the same order (no colour conversions)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.resized: dict[tuple[str, int, int], np.ndarray] = {}

    def get(self, path: str) -> np.ndarray:
        if path not in self.arrays:
            array = cv2.imread(path, cv2.IMREAD_UNCHANGED)  # (H, W, 3) BGR or (H, W, 4) BGRA
            if array is None or array.ndim != 3:
                raise OSError(f"{path}: could not read the prepared image as colour")
            self.arrays[path] = array
        return self.arrays[path]

    def get_resized(self, path: str, w: int, h: int) -> np.ndarray:
        """The image at ``path`` resized to w x h (area averaging to shrink, bilinear to enlarge), made once per
        shard: the four groups of a size paste the same resized object."""
        key = (path, w, h)
        if key not in self.resized:
            image = self.get(path)
            shrink = w <= image.shape[1] and h <= image.shape[0]
            self.resized[key] = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        return self.resized[key]


def run_compose(rows: list[Row], out: Path, quality: int) -> ShardResult:
    """Compose one shard: rows carry ``background_path``, ``object_path`` and ``object_box`` = [x0, y0, x1, y1]."""
    cache = ArrayCache()
    made = []
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    for row in rows:
        x0, y0, x1, y1 = row["object_box"]
        obj = cache.get_resized(row["object_path"], x1 - x0, y1 - y0)
        image = paste(cache.get(row["background_path"]), obj, x0, y0)
        ok, encoded = cv2.imencode(".jpg", image, params)
        if not ok:
            raise OSError(f"{row['image_id']}: could not encode the JPEG")
        path = out / f"{row['image_id']}.jpg"
        path.write_bytes(encoded.tobytes())
        made.append({**{k: v for k, v in row.items() if k not in ("background_path", "object_path")},
                     "path": str(path)})
    return ShardResult(made, [], {"composed": len(made)})


@task(name="compose-images", task_run_name="compose-shard-{index}", cache_policy=NO_CACHE)
def compose_shard_task(store: StageStore, index: int, rows: list[Row], quality: int) -> dict:
    """One shard of compositions (skipped when committed)."""
    return store.ensure_shard(index, rows, lambda shard, out: run_compose(shard, out, quality))
