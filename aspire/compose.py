"""Hard-Spurious-ImageNet (the "Corner Cases" paper, Sec. 3-5 and App. C, E, G):
class scores, the composition plan and the geometry of one composition. Prefect-free and model-free.

- Scores (Sec. 3, Eq. 1-2): centeredness ``C_c`` = mean over images of the mean over the class's objects of
  ``1 - ||I - O||_inf`` (image centre I and object centre O in coordinates normalised by the image size), and
  size ``S_c`` = mean over images of the mean of ``h * w / (H * W)``.
- Groups (Sec. 4): the core object at the **Ce**ntre or the top-right **Co**rner, on its own inpainted
  background (**O**) or another class's (**R**): CeO, CoO, CeR, CoR, at each object size. Categories: Easy
  (CeO, CoO at 84 and 112 px), Hard (CeR, CoR at 56 and 84 px), Medium (the rest).
- Splits (Sec. 5, Table 11): per class and group, ``train_easy`` train images for Easy groups, ``train_other``
  for the others, ``val`` and ``test`` for every group. Train and val sources come from the ImageNet train
  pool, split into disjoint parts; test sources from the val pool; so no source image is in two splits.
  Within a group of a split the foreground sources are distinct; one source can serve several groups (the
  paper's test split needs 600 images per class from ImageNet's 50 val images).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from aspire.config import ComposeSettings
from aspire.imagefolder import safe_name
from aspire.manifest import Row

GROUPS = ("CeO", "CoO", "CeR", "CoR")
CORNERS = ("top-right", "top-left", "bottom-left", "bottom-right")
SPLITS = ("train", "val", "test")
SPLIT_POOL = {"train": "train", "val": "train", "test": "val"}


class PlanError(ValueError):
    """The sources cannot fill the configured counts; the message names the class, split and numbers."""


# -- scores ---------------------------------------------------------------------------------------------


def image_scores(width: int, height: int, boxes: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(centeredness, size) of one image: means over its boxes of ``1 - ||I - O||_inf`` and ``h w / (H W)``."""
    centred, sizes = [], []
    for x0, y0, x1, y1 in boxes:
        cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
        centred.append(1.0 - max(abs(cx - 0.5), abs(cy - 0.5)))
        sizes.append((x1 - x0) * (y1 - y0) / (width * height))
    return float(np.mean(centred)), float(np.mean(sizes))


def class_scores(rows: Sequence[Row]) -> list[dict]:
    """Per class (sorted by wnid): ``wnid``, ``class_name``, ``images``, ``objects``, ``centeredness`` (C_c)
    and ``size`` (S_c), over the given source rows."""
    by_class: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_class[row["wnid"]].append(row)
    out = []
    for wnid, mine in sorted(by_class.items()):
        scores = np.array([image_scores(r["width"], r["height"], r["boxes"]) for r in mine])  # (M, 2)
        out.append({"wnid": wnid, "class_name": mine[0]["class_name"], "images": len(mine),
                    "objects": sum(len(r["boxes"]) for r in mine), "centeredness": round(float(scores[:, 0].mean()), 4),
                    "size": round(float(scores[:, 1].mean()), 4)})
    return out


# -- geometry -------------------------------------------------------------------------------------------


def category(group: str, size: int, sizes: Sequence[int]) -> str:
    """easy, medium or hard. With the default sizes 56/84/112: Easy = CeO/CoO at 84 and 112, Hard = CeR/CoR at
    56 and 84. Other size lists keep the rule by rank: O groups at all but the smallest size are Easy, R
    groups at all but the largest are Hard."""
    ranked = sorted(sizes)
    if group.endswith("O"):
        return "easy" if size != ranked[0] or len(ranked) == 1 else "medium"
    return "hard" if size != ranked[-1] or len(ranked) == 1 else "medium"


def object_size(width: float, height: float, size: int, aspect: str, canvas: int) -> tuple[int, int]:
    """(w, h) of the pasted object: ``size`` x ``size`` (square), or the shorter side at ``size`` with the aspect
    ratio kept, downscaled so that the longer side fits the canvas (preserve)."""
    if aspect == "square":
        return size, size
    scale = size / min(width, height)
    if max(width, height) * scale > canvas:
        scale = canvas / max(width, height)
    return max(1, min(canvas, round(width * scale))), max(1, min(canvas, round(height * scale)))


def placement(w: int, h: int, position: str, canvas: int) -> tuple[int, int]:
    """Top-left pixel (x, y) of a w x h object at ``center`` or a corner of the canvas."""
    if position == "center":
        return (canvas - w) // 2, (canvas - h) // 2
    x = canvas - w if position.endswith("right") else 0
    y = 0 if position.startswith("top") else canvas - h
    return x, y


def paste(background: np.ndarray, obj: np.ndarray, x: int, y: int) -> np.ndarray:
    """A copy of ``background`` (H, W, 3) with ``obj`` (h, w, 3 or 4; alpha blends) at (x, y)."""
    out = background.copy()
    h, w = obj.shape[:2]
    if obj.shape[2] == 4:
        alpha = obj[:, :, 3:4].astype(np.float32) / 255.0
        region = out[y : y + h, x : x + w].astype(np.float32)
        out[y : y + h, x : x + w] = (alpha * obj[:, :, :3] + (1 - alpha) * region + 0.5).astype(np.uint8)
    else:
        out[y : y + h, x : x + w] = obj
    return out


# -- the plan -------------------------------------------------------------------------------------------


def rng_for(seed: int, *names: object) -> np.random.Generator:
    """A generator for one decision, independent of every other (stable across runs and machines)."""
    text = "|".join(map(str, (seed, *names)))
    return np.random.default_rng(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little"))


def count(split: str, group: str, size: int, settings: ComposeSettings) -> int:
    """Images per class of one (split, group, size)."""
    if split == "train":
        easy = category(group, size, settings.sizes) == "easy"
        return settings.counts.train_easy if easy else settings.counts.train_other
    return settings.counts.val if split == "val" else settings.counts.test


def split_pools(rows: Sequence[Row], settings: ComposeSettings) -> dict[tuple[str, str], list[Row]]:
    """Per (split, wnid): the source rows the split may use. A class's train pool is shuffled (seeded) and cut:
    the first ``counts.val`` images go to val, the rest to train; test uses the val pool."""
    pools: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        pools[(row["pool"], row["wnid"])].append(row)
    out: dict[tuple[str, str], list[Row]] = {}
    for (pool, wnid), mine in sorted(pools.items()):
        mine = sorted(mine, key=lambda r: r["image_id"])
        if pool == "val":
            out[("test", wnid)] = mine
            continue
        order = rng_for(settings.seed, "pool", wnid).permutation(len(mine))
        shuffled = [mine[i] for i in order]
        out[("val", wnid)] = shuffled[: settings.counts.val]
        out[("train", wnid)] = shuffled[settings.counts.val :]
    return out


def background_classes(foreground: Sequence[str], available: Sequence[str], settings: ComposeSettings) -> dict[str, list[str]]:
    """Per foreground wnid, the classes its R backgrounds come from: every other class (v1), or one class of
    ``v2_backgrounds`` in turn (v2)."""
    if settings.variant == "v1":
        return {wnid: [other for other in available if other != wnid] for wnid in foreground}
    backgrounds = [b for b in settings.v2_backgrounds if b in available]
    if not backgrounds:
        raise PlanError(f"compose.variant=v2: none of compose.v2_backgrounds {settings.v2_backgrounds} is among the "
                        f"source classes {list(available)}")
    return {wnid: [backgrounds[i % len(backgrounds)]] for i, wnid in enumerate(foreground)}


def plan(rows: Sequence[Row], foreground: Sequence[str], settings: ComposeSettings, names: dict[str, str],
         variant: str) -> list[Row]:
    """Every composition to make, in a stable order, as rows (see :func:`composition_row`).

    Args:
        rows: source rows (:mod:`aspire.imagenet`) of the foreground classes and, for v2, the background classes.
        foreground: wnids composed as objects (label = the rank of the class's folder name among theirs, the order
            torchvision ``ImageFolder`` and ``datasets`` give the written image folder).
        settings: the compose section.
        names: wnid -> class name.
        variant: the ``variant`` column (``v1``, ``v2``, with ``-sam`` for segmenter masks).

    Raises:
        PlanError: a class has too few sources for a split's count, or no background class has sources.
    """
    pools = split_pools(rows, settings)
    available = sorted({r["wnid"] for r in rows})
    bg_classes = background_classes(foreground, available, settings)
    folders = sorted(foreground, key=lambda w: (safe_name(names.get(w, w)), w))
    out = []
    for split in SPLITS:
        for wnid in foreground:
            label = folders.index(wnid)
            pool = pools.get((split, wnid), [])
            for group in GROUPS:
                for size in settings.sizes:
                    n = count(split, group, size, settings)
                    if n > len(pool):
                        raise PlanError(f"class {wnid} ({names.get(wnid, wnid)}), split {split}: group {group} at "
                                        f"{size} px needs {n} distinct source images, the {SPLIT_POOL[split]} pool "
                                        f"has {len(pool)} with boxes")
                    rng = rng_for(settings.seed, split, wnid, group, size)
                    picks = [pool[i] for i in sorted(rng.choice(len(pool), n, replace=False))] if n else []
                    for k, source in enumerate(picks):
                        if group.endswith("O"):
                            background = source
                        else:
                            options = [c for c in bg_classes[wnid] if pools.get((split, c))]
                            if not options:
                                raise PlanError(f"class {wnid}, split {split}: no background class with source "
                                                f"images among {bg_classes[wnid]}")
                            bg_pool = pools[(split, options[rng.integers(len(options))])]
                            background = bg_pool[rng.integers(len(bg_pool))]
                        if group.startswith("Ce"):
                            position = "center"
                        elif split == "test" and settings.test_corner == "random":
                            position = CORNERS[rng.integers(len(CORNERS))]
                        else:
                            position = "top-right"
                        out.append(composition_row(split, label, wnid, names, group, size, k, source, background,
                                                   position, settings, variant))
    return out


def largest_box(boxes: Sequence[Sequence[float]]) -> list[float]:
    """The box of largest area (the paper composes one object per image)."""
    return list(max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])))


def composition_row(split: str, label: int, wnid: str, names: dict[str, str], group: str, size: int, k: int,
                    source: Row, background: Row, position: str, settings: ComposeSettings, variant: str) -> Row:
    """One planned composition: the output manifest row (``path`` is filled when it is made).

    ``group`` is the integer id ``GROUPS.index(letters) * len(sizes) + size rank`` and ``group_name`` e.g.
    ``CeR56``, so group-aware trainers see the four letters x size."""
    x0, y0, x1, y1 = largest_box(source["boxes"])
    aspect = settings.aspect if split == "test" else "square"  # the AR-preserving variant is a test set (Sec. 4)
    w, h = object_size(x1 - x0, y1 - y0, size, aspect, settings.canvas)
    x, y = placement(w, h, position, settings.canvas)
    return {"image_id": f"{split}-{wnid}-{group}{size}-{k:04d}", "split": split, "label": label, "wnid": wnid,
            "class_name": names.get(wnid, wnid), "group": GROUPS.index(group) * len(settings.sizes)
            + settings.sizes.index(size), "group_name": f"{group}{size}", "letters": group,
            "category": category(group, size, settings.sizes), "size": size, "position": position,
            "object_box": [x, y, x + w, y + h], "variant": variant, "aspect": aspect,
            "foreground_image": source["image_id"], "background_image": background["image_id"],
            "background_wnid": background["wnid"], "background_class": background["class_name"]}
