"""The CPU world's stand-in for ImageNet weights: the small CNN pretrained once on a large, balanced synthetic corpus.

DFR, CLARIFY and SLIM assume the reference model's features already hold the core feature and only its head leans
on the spurious one. Real users get that from ImageNet (resnet50); a small CNN trained from scratch on one
synthetic benchmark does not have it. ``classifier.weights: synthetic-pretrain`` gives the small CNN a backbone
pretrained on a corpus drawn here with

- its own classes: shapes none of the benchmarks can use (:data:`PRETRAIN_SHAPES` is disjoint from
  :data:`aspire.synth.Shape`), each in a random colour per image, so colour is never a class cue;
- every class on every background: each image's texture type and colours are drawn at random, independently of
  the class;
- a distractor object (another pretraining shape, smaller) in 30% of the images, independent of the class.

So the only thing that predicts the class is the shape's outline: the backbone learns edges, corners and
curvature, which transfer to the benchmarks' circles, triangles and squares as ImageNet features transfer to
birds. The backbone (``SmallCNN.features``) is trained with :func:`aspire.classifier.fit` and committed once per
(corpus, image size, training settings) under ``<cache>/pretrain/<key>/backbone/``; every fine-tuning run then
loads it and gets a fresh head, as torchvision's resnet50 does with ImageNet weights.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from aspire.cache import StageStore, stage_key
from aspire.config import ClassifierConfig, PretrainConfig
from aspire.manifest import Row
from aspire.synth import CORE_SIZE_RANGE, OBJECT_SIZE_RANGE, BackgroundSpec, draw_texture

log = logging.getLogger(__name__)

VERSION = 1
"""Bump when the corpus or the training recipe changes: the cached backbone is then rebuilt."""

BACKBONE_FILE = "backbone.pt"

# Unit polygons (inscribed in the unit circle, y down), none of them a benchmark shape.
PRETRAIN_SHAPES: dict[str, list[tuple[float, float]]] = {
    "pentagon": [(math.cos(a), math.sin(a)) for a in np.deg2rad(np.arange(-90, 270, 72))],
    "octagon": [(math.cos(a), math.sin(a)) for a in np.deg2rad(np.arange(22.5, 360, 45))],
    "trapezoid": [(-0.45, -0.6), (0.45, -0.6), (0.95, 0.6), (-0.95, 0.6)],
    "arrow": [(-0.95, -0.25), (0.2, -0.25), (0.2, -0.7), (0.95, 0.0), (0.2, 0.7), (0.2, 0.25), (-0.95, 0.25)],
    "semicircle": [(math.cos(a), 0.35 + math.sin(a)) for a in np.linspace(np.pi, 2 * np.pi, 24)],
    "chevron": [(-0.9, -0.7), (0.0, 0.1), (0.9, -0.7), (0.9, 0.0), (0.0, 0.8), (-0.9, 0.0)],
    "bowtie": [(-0.9, -0.7), (0.0, -0.1), (0.9, -0.7), (0.9, 0.7), (0.0, 0.1), (-0.9, 0.7)],
    "ell": [(-0.6, -0.8), (-0.15, -0.8), (-0.15, 0.35), (0.7, 0.35), (0.7, 0.8), (-0.6, 0.8)],
    "tee": [(-0.8, -0.75), (0.8, -0.75), (0.8, -0.3), (0.22, -0.3), (0.22, 0.85), (-0.22, 0.85), (-0.22, -0.3),
            (-0.8, -0.3)],
    "house": [(0.0, -0.95), (0.8, -0.2), (0.8, 0.8), (-0.8, 0.8), (-0.8, -0.2)],
}
TEXTURES = ("noise", "hstripes", "vstripes", "waves", "dots", "checker")
MAX_ROTATION_DEG = 30.0
DISTRACTOR_RATE = 0.3
MIN_CONTRAST = 150.0
TEXTURE_AMPLITUDE = 0.35
"""Textures are drawn at this fraction of their contrast: the outline must be what the backbone learns first."""


def _polygon(shape: str, cx: float, cy: float, radius: float, angle_deg: float) -> list[tuple[float, float]]:
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in PRETRAIN_SHAPES[shape]]


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = rng.integers(0, 256, size=3)
    return int(r), int(g), int(b)


def _contrasting(rng: np.random.Generator, against: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """A random colour at least :data:`MIN_CONTRAST` (RGB distance) from every colour of ``against`` (the
    texture's), so the shape's outline is always visible; after 20 misses, the inverse of the first."""
    for _ in range(20):
        color = _color(rng)
        if min(np.linalg.norm(np.subtract(color, c)) for c in against) >= MIN_CONTRAST:
            return color
    r, g, b = against[0]
    return 255 - r, 255 - g, 255 - b


def draw_pretrain_image(rng: np.random.Generator, shape: str, shapes: list[str], size: int) -> Image.Image:
    """One corpus image: a random texture in random colours, maybe a distractor shape, the class shape on top (both
    in colours that stand out from the texture)."""
    palette = [_color(rng), _color(rng)]
    texture = BackgroundSpec(name="any", texture=TEXTURES[int(rng.integers(len(TEXTURES)))], colors=palette,
                             words=["any"])
    pixels = draw_texture(rng, texture, size).astype(np.float64)
    pixels = pixels.mean((0, 1)) + TEXTURE_AMPLITUDE * (pixels - pixels.mean((0, 1)))  # every texture, subdued
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    if rng.random() < DISTRACTOR_RATE:
        other = [s for s in shapes if s != shape][int(rng.integers(len(shapes) - 1))]
        radius = size * rng.uniform(*OBJECT_SIZE_RANGE) / 2
        cx, cy = rng.uniform(radius, size - radius, size=2)
        draw.polygon(_polygon(other, cx, cy, radius, rng.uniform(-180, 180)), fill=_contrasting(rng, palette))
    radius = size * rng.uniform(*CORE_SIZE_RANGE) / 2
    cx, cy = rng.uniform(radius, size - radius, size=2)
    draw.polygon(_polygon(shape, cx, cy, radius, rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)),
                 fill=_contrasting(rng, palette))
    return image


def draw_corpus(pretrain: PretrainConfig, size: int, out: Path) -> list[Row]:
    """Draw the balanced corpus into ``out/<split>/<shape>/<i>.png`` (train: ``images_per_class``, val: a tenth).

    Every image has its own generator seeded by (pretrain seed, split, index): the corpus depends on the config only.
    """
    shapes = list(PRETRAIN_SHAPES)[: pretrain.classes]
    rows: list[Row] = []
    for split, per_class in (("train", pretrain.images_per_class), ("val", max(2, pretrain.images_per_class // 10))):
        for label, shape in enumerate(shapes):
            (out / split / shape).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                rng = np.random.default_rng(np.random.SeedSequence([pretrain.seed, int(split == "val"), label, k]))
                path = out / split / shape / f"{k:05d}.png"
                draw_pretrain_image(rng, shape, shapes, size).save(path)
                rows.append({"image_id": f"pretrain-{split}-{label}-{k}", "path": str(path), "label": label,
                             "class_name": shape, "split": split})
    return rows


def cache_root(pretrain: PretrainConfig) -> Path:
    """``pretrain.cache``, else ``$ASPIRE_CACHE``, else ``~/.cache/aspire``."""
    return Path(pretrain.cache or os.environ.get("ASPIRE_CACHE") or Path.home() / ".cache" / "aspire").expanduser()


def backbone_store(config: ClassifierConfig) -> StageStore:
    """Where the backbone of this corpus, image size and recipe is committed."""
    settings = {"pretrain": config.pretrain.model_dump(mode="json", exclude={"cache"}), "image_size": config.image_size,
                "arch": config.arch, "batch_size": config.batch_size}
    return StageStore(cache_root(config.pretrain), "pretrain", stage_key("pretrain", VERSION, settings, "small-cnn", ""))


def pretrained_backbone(config: ClassifierConfig) -> dict[str, torch.Tensor]:
    """The pretrained ``SmallCNN.features`` state dict, trained and committed on first use (minutes on a CPU).

    Raises:
        ValueError: the architecture is not ``small-cnn`` (torchvision architectures take ``weights: imagenet``).
    """
    from aspire.classifier import SmallCNN, fit, save_torch

    if config.arch != "small-cnn":
        raise ValueError(f"classifier.weights='synthetic-pretrain' is for arch 'small-cnn', not {config.arch!r} "
                         "(use weights: imagenet or a state_dict path)")
    store = backbone_store(config)

    def write(tmp: Path) -> dict:
        pretrain = config.pretrain
        log.info("pretraining the small CNN on a balanced synthetic corpus (%d shapes x %d images, %d epochs), "
                 "committed to %s", pretrain.classes, pretrain.images_per_class, pretrain.epochs, store.root)
        corpus = tmp / "corpus"
        rows = draw_corpus(pretrain, config.image_size, corpus)
        train_config = config.model_copy(update={"epochs": pretrain.epochs, "lr": pretrain.lr, "seed": pretrain.seed})
        with torch.random.fork_rng():
            torch.manual_seed(pretrain.seed)
            model = SmallCNN(pretrain.classes)
        history, best = fit(model, [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "val"],
                            train_config, pretrain.seed)
        shutil.rmtree(corpus)  # the images are redrawn from the seed when needed; only the weights are kept
        save_torch(model.features.state_dict(), tmp / BACKBONE_FILE)
        return {"val_acc": history[best]["val_avg_acc"], "epochs": len(history)}

    marker = store.ensure_part("backbone", write, checked_files=(BACKBONE_FILE,))
    if not marker["cached"]:
        log.info("synthetic-pretrain backbone: held-out corpus accuracy %.3f", marker["val_acc"])
    return torch.load(store.part_dir("backbone") / BACKBONE_FILE, map_location="cpu", weights_only=True)
