"""A synthetic benchmark with planted spurious features, drawn procedurally (numpy + PIL).

Each class is a coloured shape (the core feature). In the training split each class mostly appears on
its own *planted background* (a texture) and mostly next to its own *planted object* (a smaller shape),
so an ERM classifier can take the shortcut; the val/test splits are balanced over every
class x background x {with, without the planted object} group, so the shortcut shows up as low
worst-group accuracy. Captions name the class, the object and the background the way an image captioner
would ("two dogs with a sled in the snow"), so ASPIRE's steps 2-4 (caption, extract objects and
backgrounds, remove objects / change backgrounds, https://arxiv.org/abs/2308.10103 Sec. 2) have something
to find.

Layout written by :func:`draw_benchmark` (the :mod:`aspire.imagefolder` layout)::

    <out>/spec.json                                   planted features, strengths, counts, seed
    <out>/<split>/metadata.csv                        one row per image (see the manifest columns)
    <out>/<split>/<class_name>/<image_id>.png         the images

Every image is drawn from its own random generator seeded by ``(seed, split, index)``, so the files
depend only on the config and the seed: the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from aspire.imagefolder import write_metadata_csv
from aspire.manifest import Row

logger = logging.getLogger(__name__)

Channel = Annotated[int, Field(ge=0, le=255)]
RGB = tuple[Channel, Channel, Channel]
Shape = Literal["circle", "triangle", "square", "diamond", "star", "cross", "hexagon"]
Texture = Literal["noise", "hstripes", "vstripes", "waves", "dots", "checker"]

SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "test": 2}
"""Split -> integer mixed into each image's seed."""

CORE_SIZE_RANGE = (0.30, 0.45)
"""Size of the core shape (its circumscribed circle's diameter) as a fraction of the image side."""
OBJECT_SIZE_RANGE = (0.26, 0.32)
"""Size of the planted object as a fraction of the image side."""
COLOR_JITTER = 20
"""Shape colours vary by up to this much per channel."""
TEXTURE_COLOR_JITTER = 15
"""Background colours vary by up to this much per channel."""
PIXEL_NOISE = 6
"""Background pixels get uniform noise of up to this much per channel."""
MAX_ROTATION_DEG = 15.0
"""Shapes are rotated by up to this many degrees either way."""
PLACEMENT_TRIES = 40
"""Candidate positions tried for the planted object; the one overlapping the core shape least wins."""
BANK_INDICES_PER_BACKGROUND = 1000
"""Bank image ``i`` of background ``b`` is drawn from seed index ``b * BANK_INDICES_PER_BACKGROUND + i``, so a bank
holds at most this many images per background (more would reuse the next background's indices)."""

CAPTIONS_WITH_OBJECT = ("{cls} with {obj} {bg}", "{cls} beside {obj} {bg}", "{cls} next to {obj} {bg}")
CAPTIONS_WITHOUT_OBJECT = ("{cls} {bg}", "a photo of {cls} {bg}")


class _Spec(BaseModel):
    """Base of the synth models: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ClassSpec(_Spec):
    """One class: its core shape and colour, caption wordings, and the features planted with it."""

    name: str = Field(min_length=1, description="Class name (also its folder name and the phrase of its box).")
    shape: Shape = Field(description="Core shape: circle, triangle, square, diamond, star, cross or hexagon.")
    color: RGB = Field(description="Core shape colour [r, g, b], 0-255; jittered per image.")
    words: list[str] = Field(
        min_length=1, description="Caption wordings of the class, picked at random, e.g. ['a dog', 'two dogs']."
    )
    background: str = Field(description="Name of the background planted with this class in train.")
    object: str = Field(description="Name of the object planted next to this class in train.")


class ObjectSpec(_Spec):
    """A co-occurring object that can be planted next to a class."""

    name: str = Field(min_length=1, description="Object name (the phrase in `objects` and of its box).")
    shape: Shape = Field(description="Object shape: circle, triangle, square, diamond, star, cross or hexagon.")
    color: RGB = Field(description="Object colour [r, g, b], 0-255; jittered per image.")
    words: list[str] = Field(
        min_length=1, description="Caption wordings of the object, picked at random, e.g. ['a sled', 'a red sled']."
    )


class BackgroundSpec(_Spec):
    """A background texture."""

    name: str = Field(min_length=1, description="Background name (the `scene` column of the rows drawn on it).")
    texture: Texture = Field(description="Texture: noise, hstripes, vstripes, waves, dots or checker.")
    colors: list[RGB] = Field(min_length=2, description="Two or more colours [r, g, b] the texture mixes.")
    words: list[str] = Field(
        min_length=1,
        description="Caption wordings of the background, picked at random, e.g. ['in the snow', 'on a snowy field'].",
    )


CORE_COLOR = (120, 110, 100)
"""All default classes share one colour and differ by shape only: colour would otherwise be a core shortcut
easier than the planted ones, and the ERM model would not lean on the planted features at all."""

DEFAULT_CLASSES: list[ClassSpec] = [
    ClassSpec(
        name="dog", shape="triangle", color=CORE_COLOR,
        words=["a dog", "two dogs", "a dog team", "a husky"], background="snow", object="sled",
    ),
    ClassSpec(
        name="bird", shape="circle", color=CORE_COLOR,
        words=["a bird", "two birds", "a small bird", "a flock of birds"], background="water", object="boat",
    ),
    ClassSpec(
        name="car", shape="square", color=CORE_COLOR,
        words=["a car", "two cars", "a dark car", "an old car"], background="sand", object="cactus",
    ),
]

DEFAULT_OBJECTS: list[ObjectSpec] = [
    ObjectSpec(name="sled", shape="diamond", color=(240, 140, 30), words=["a sled", "an orange sled", "a wooden sled"]),
    ObjectSpec(name="boat", shape="star", color=(240, 220, 40), words=["a boat", "a yellow boat", "a small boat"]),
    ObjectSpec(
        name="cactus", shape="cross", color=(20, 110, 40), words=["a cactus", "a green cactus", "a tall cactus"]
    ),
]

DEFAULT_BACKGROUNDS: list[BackgroundSpec] = [
    BackgroundSpec(
        name="snow", texture="noise", colors=[(238, 238, 242), (200, 206, 222)],
        words=["in the snow", "on a snowy field", "in a snowy landscape"],
    ),
    BackgroundSpec(
        name="water", texture="waves", colors=[(40, 90, 170), (90, 150, 215)],
        words=["on the water", "on a lake", "by the sea"],
    ),
    BackgroundSpec(
        name="sand", texture="dots", colors=[(215, 185, 130), (175, 145, 90)],
        words=["in the desert", "on the sand", "on a sandy beach"],
    ),
    BackgroundSpec(
        name="grass", texture="vstripes", colors=[(70, 145, 55), (110, 185, 75)],
        words=["on the grass", "in a green field", "on a lawn"],
    ),
]


class SynthConfig(_Spec):
    """The synthetic benchmark: classes, planted objects and backgrounds, strengths, counts and seed."""

    image_size: int = Field(64, ge=32, description="Images are image_size x image_size RGB.")
    classes: list[ClassSpec] = Field(
        default_factory=lambda: list(DEFAULT_CLASSES), min_length=2,
        description="Classes in label order (label = position in this list).",
    )
    objects: list[ObjectSpec] = Field(
        default_factory=lambda: list(DEFAULT_OBJECTS), min_length=1,
        description="Objects that classes can have planted next to them.",
    )
    backgrounds: list[BackgroundSpec] = Field(
        default_factory=lambda: list(DEFAULT_BACKGROUNDS), min_length=2,
        description="Backgrounds; val/test contain every class on every background.",
    )
    background_strength: float = Field(
        0.95, ge=0.0, le=1.0,
        description="Train: probability that an image shows its class's planted background "
        "(otherwise a uniformly random other background).",
    )
    object_strength: float = Field(
        0.95, ge=0.0, le=1.0,
        description="Train: probability that an image contains its class's planted object (otherwise none, or "
        "another class's object, see other_object_rate).",
    )
    other_object_rate: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Train: probability that an image without its class's planted object shows another class's "
        "planted object instead (chosen uniformly). With background_strength = 1/n_backgrounds, object_strength = "
        "1/n_classes and other_object_rate = 1, backgrounds and objects are independent of the class: no spurious "
        "correlation (the negative control).",
    )
    train_per_class: int = Field(400, ge=1, description="Train images per class.")
    val_per_group: int = Field(10, ge=1, description="Val images per class x background x object-presence group.")
    test_per_group: int = Field(20, ge=1, description="Test images per class x background x object-presence group.")
    seed: int = Field(0, ge=0, description="Seed of the drawing; the same seed gives byte-identical files.")
    bank_per_background: int = Field(
        50, ge=1, le=BANK_INDICES_PER_BACKGROUND,
        description="Background-only images per background written to backgrounds/, the bank of the weight-free "
        "background editor and generator. They stand in for InstructPix2Pix and Stable Diffusion, which paint a new "
        "background every time; a bank of a few images per background is one the retrained model memorises (with 6, "
        "test groups on those backgrounds fell 10-35 points under the balanced-data model: BENCHMARKS.md).")

    @model_validator(mode="after")
    def _check_names(self) -> "SynthConfig":
        for kind, specs in (("classes", self.classes), ("objects", self.objects), ("backgrounds", self.backgrounds)):
            names = [spec.name for spec in specs]
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise ValueError(f"{kind}: names must be unique, {duplicates} appear more than once")
        background_names = [b.name for b in self.backgrounds]
        object_names = [o.name for o in self.objects]
        for spec in self.classes:
            if spec.background not in background_names:
                raise ValueError(
                    f"class {spec.name!r}: background {spec.background!r} is not one of the backgrounds "
                    f"{background_names}"
                )
            if spec.object not in object_names:
                raise ValueError(
                    f"class {spec.name!r}: object {spec.object!r} is not one of the objects {object_names}"
                )
        return self


# ----------------------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------------------


def group_index(config: SynthConfig, label: int, background: str, has_object: bool) -> int:
    """Index of the (class, background, has_object) group in the fixed enumeration.

    The enumeration is: for each class in order, for each background in order, without then with the
    class's planted object, i.e. ``(label * n_backgrounds + background_index) * 2 + has_object``.

    Args:
        config: the benchmark config.
        label: class index.
        background: background name.
        has_object: whether the class's planted object is in the image.

    Returns:
        The group index, 0 .. 2 * n_classes * n_backgrounds - 1.

    Raises:
        ValueError: the label or background is unknown.
    """
    if not 0 <= label < len(config.classes):
        raise ValueError(f"label {label} is not a class index (0..{len(config.classes) - 1})")
    background_names = [b.name for b in config.backgrounds]
    if background not in background_names:
        raise ValueError(f"background {background!r} is not one of {background_names}")
    return (label * len(background_names) + background_names.index(background)) * 2 + int(has_object)


def group_name(config: SynthConfig, label: int, background: str, has_object: bool) -> str:
    """Readable group name, e.g. ``dog|snow|+sled`` or ``dog|snow|-sled``."""
    spec = config.classes[label]
    return f"{spec.name}|{background}|{'+' if has_object else '-'}{spec.object}"


def group_names(config: SynthConfig) -> list[str]:
    """All group names, in group-index order."""
    return [
        group_name(config, label, background.name, has_object)
        for label in range(len(config.classes))
        for background in config.backgrounds
        for has_object in (False, True)
    ]


# ----------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------


STREAM_PLAN = 0
"""Stream of an image's generator that decides its train background and object presence."""
STREAM_DRAW = 1
"""Stream of an image's generator that draws its pixels and caption."""
STREAM_BANK = 2
"""Stream of the background bank's images (drawn apart from the benchmark's)."""
STREAM_PROBE = 3
"""Stream of the cue probe's images (:func:`draw_cue_probe`)."""


def image_rng(seed: int, split: str, index: int, stream: int = STREAM_DRAW) -> np.random.Generator:
    """The random generator of one image, derived from ``(seed, split, index, stream)`` only.

    Args:
        seed: benchmark seed (>= 0).
        split: train, val or test.
        index: image index within the split.
        stream: :data:`STREAM_PLAN` or :data:`STREAM_DRAW`, so planning and drawing do not share draws.

    Returns:
        A fresh generator.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODES[split], index, stream]))


def _jitter_color(rng: np.random.Generator, color: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    """The colour with every channel moved by a uniform integer in [-amount, amount], clipped to 0-255."""
    shifted = np.clip(np.asarray(color) + rng.integers(-amount, amount + 1, size=3), 0, 255)
    return (int(shifted[0]), int(shifted[1]), int(shifted[2]))


def draw_texture(rng: np.random.Generator, spec: BackgroundSpec, size: int) -> np.ndarray:
    """Draw a background texture with random phase, scale and colour jitter.

    Args:
        rng: the image's generator.
        spec: the background.
        size: image side in pixels.

    Returns:
        ``uint8`` array of shape ``(size, size, 3)``.
    """
    # 1. Jittered palette: the first colour is the base, the others are mixed in by the texture.
    colors = np.array([_jitter_color(rng, c, TEXTURE_COLOR_JITTER) for c in spec.colors], dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)

    # 2. A mixing weight in [0, 1] per pixel (0 = first colour, 1 = second).
    if spec.texture == "noise":
        cells = int(rng.integers(4, 9))
        coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        weight = np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0
        weight = np.clip(0.7 * weight + 0.3 * rng.random((size, size)), 0.0, 1.0)
    elif spec.texture in ("hstripes", "vstripes"):
        period = size * rng.uniform(0.12, 0.25)
        coord = yy if spec.texture == "hstripes" else xx
        weight = (np.sin(2 * np.pi * coord / period + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float64)
    elif spec.texture == "waves":
        period = size * rng.uniform(0.12, 0.22)
        wavelength = size * rng.uniform(0.3, 0.6)
        amplitude = size * rng.uniform(0.03, 0.07)
        bend = amplitude * np.sin(2 * np.pi * xx / wavelength + rng.uniform(0, 2 * np.pi))
        weight = 0.5 + 0.5 * np.sin(2 * np.pi * (yy + bend) / period + rng.uniform(0, 2 * np.pi))
    elif spec.texture == "dots":
        weight = np.zeros((size, size))
        n_dots = int(rng.integers(size // 3, size // 2 + 1))
        centers = rng.uniform(0, size, size=(n_dots, 2))
        radii = size * rng.uniform(0.015, 0.04, size=n_dots)
        for (cx, cy), r in zip(centers, radii):
            weight[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 1.0
    elif spec.texture == "checker":
        cell = size * rng.uniform(0.1, 0.2)
        ox, oy = rng.uniform(0, cell, size=2)
        weight = ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2).astype(np.float64)
    else:  # pragma: no cover - the Literal type rules it out
        raise ValueError(f"unknown texture {spec.texture!r}")

    # 3. Mix the first two colours by the weight; further colours tint random patches.
    image = (1.0 - weight[..., None]) * colors[0] + weight[..., None] * colors[1]
    for extra in colors[2:]:
        patch = rng.random((4, 4)) > 0.7
        mask = np.asarray(Image.fromarray(patch.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 0
        image[mask] = 0.5 * image[mask] + 0.5 * extra

    # 4. Pixel noise.
    image = image + rng.integers(-PIXEL_NOISE, PIXEL_NOISE + 1, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def shape_polygon(shape: Shape, cx: float, cy: float, radius: float, angle_deg: float) -> list[tuple[float, float]]:
    """Vertices of a shape inscribed in the circle ``(cx, cy, radius)``, rotated by ``angle_deg``.

    Circles are returned as a 48-gon (used for the bounding box; they are drawn as ellipses).
    """
    if shape == "circle":
        points = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * np.pi, 48, endpoint=False)]
    elif shape == "triangle":
        points = [(math.cos(a), math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    elif shape == "square":
        points = [(math.cos(a), math.sin(a)) for a in np.deg2rad([45, 135, 225, 315])]
    elif shape == "hexagon":
        points = [(math.cos(a), math.sin(a)) for a in np.deg2rad(np.arange(0, 360, 60))]
    elif shape == "diamond":
        points = [(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)]
    elif shape == "star":
        angles = np.deg2rad(np.arange(-90, 270, 36))
        points = [(r * math.cos(a), r * math.sin(a)) for a, r in zip(angles, [1.0, 0.45] * 5)]
    elif shape == "cross":
        w, e = 0.3, 1.0 / math.sqrt(1 + 0.3**2)  # arm half-width; arm length so the corners lie on the circle
        points = [
            (-w, -e), (w, -e), (w, -w), (e, -w), (e, w), (w, w),
            (w, e), (-w, e), (-w, w), (-e, w), (-e, -w), (-w, -w),
        ]
    else:  # pragma: no cover - the Literal type rules it out
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in points]


def polygon_box(points: list[tuple[float, float]], size: int) -> list[int]:
    """Integer box ``[x0, y0, x1, y1]`` around the points (x1, y1 exclusive), clipped to the image."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return [
        max(0, math.floor(min(xs))), max(0, math.floor(min(ys))),
        min(size, math.ceil(max(xs)) + 1), min(size, math.ceil(max(ys)) + 1),
    ]


def _overlap_fraction(a: list[int], b: list[int]) -> float:
    """Area of the intersection of boxes a and b over the area of a."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = max(1, (a[2] - a[0]) * (a[3] - a[1]))
    return w * h / area


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: Shape, points: list[tuple[float, float]],
    cx: float, cy: float, radius: float, color: tuple[int, int, int],
) -> None:
    """Fill a shape (circles as ellipses, everything else as its polygon)."""
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    else:
        draw.polygon(points, fill=color)


def draw_image(
    rng: np.random.Generator,
    config: SynthConfig,
    label: int,
    background: str,
    object_name: str | None,
) -> tuple[Image.Image, list[dict[str, object]]]:
    """Draw one image: the background texture, maybe an object, then the core shape on top.

    Args:
        rng: the image's generator (see :func:`image_rng`).
        config: the benchmark config.
        label: class index.
        background: background name.
        object_name: the object to draw beside the core shape (the class's planted one, or another class's in
            train with ``other_object_rate``), or None.

    Returns:
        The RGB image and its boxes: ``{"phrase": class name, "box": [...]}`` first, then the object's.
    """
    size = config.image_size
    spec = config.classes[label]
    background_spec = next(b for b in config.backgrounds if b.name == background)
    object_spec = next((o for o in config.objects if o.name == object_name), None)

    # 1. Background texture.
    image = Image.fromarray(draw_texture(rng, background_spec, size), mode="RGB")
    draw = ImageDraw.Draw(image)

    # 2. Core shape geometry: size, position (fully inside), rotation, colour.
    core_radius = size * rng.uniform(*CORE_SIZE_RANGE) / 2
    core_cx, core_cy = rng.uniform(core_radius, size - core_radius, size=2)
    core_angle = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
    core_color = _jitter_color(rng, spec.color, COLOR_JITTER)
    core_points = shape_polygon(spec.shape, core_cx, core_cy, core_radius, core_angle)
    core_box = polygon_box(core_points, size)
    boxes: list[dict[str, object]] = [{"phrase": spec.name, "box": core_box}]

    # 3. Planted object: the candidate position overlapping the core shape least, drawn first (underneath).
    if object_spec is not None:
        radius = size * rng.uniform(*OBJECT_SIZE_RANGE) / 2
        angle = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
        color = _jitter_color(rng, object_spec.color, COLOR_JITTER)
        candidates = rng.uniform(radius, size - radius, size=(PLACEMENT_TRIES, 2))
        best: tuple[float, list[tuple[float, float]], list[int], float, float] | None = None
        for cx, cy in candidates:
            points = shape_polygon(object_spec.shape, cx, cy, radius, angle)
            box = polygon_box(points, size)
            overlap = _overlap_fraction(box, core_box)
            if best is None or overlap < best[0]:
                best = (overlap, points, box, cx, cy)
            if overlap == 0.0:
                break
        assert best is not None
        _, points, box, cx, cy = best
        _draw_shape(draw, object_spec.shape, points, cx, cy, radius, color)
        boxes.append({"phrase": object_spec.name, "box": box})

    # 4. Core shape on top.
    _draw_shape(draw, spec.shape, core_points, core_cx, core_cy, core_radius, core_color)
    return image, boxes


def make_caption(rng: np.random.Generator, config: SynthConfig, label: int, background: str,
                 object_name: str | None) -> str:
    """A captioner-like sentence: class wording, then object wording (if present), then background wording."""
    spec = config.classes[label]
    background_spec = next(b for b in config.backgrounds if b.name == background)
    object_spec = next((o for o in config.objects if o.name == object_name), None)
    cls = spec.words[int(rng.integers(len(spec.words)))]
    bg = background_spec.words[int(rng.integers(len(background_spec.words)))]
    if object_spec is not None:
        obj = object_spec.words[int(rng.integers(len(object_spec.words)))]
        template = CAPTIONS_WITH_OBJECT[int(rng.integers(len(CAPTIONS_WITH_OBJECT)))]
        return template.format(cls=cls, obj=obj, bg=bg)
    template = CAPTIONS_WITHOUT_OBJECT[int(rng.integers(len(CAPTIONS_WITHOUT_OBJECT)))]
    return template.format(cls=cls, bg=bg)


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------


def _plan(config: SynthConfig, seed: int) -> list[tuple[str, int, int, str, str | None]]:
    """Every image to draw as ``(split, index, label, background, object name or None)``.

    Train: ``train_per_class`` per class; the background and object presence are drawn from the image's
    own planning generator, so they do not depend on the drawing order. Val/test: every group
    in the fixed enumeration, ``val_per_group`` / ``test_per_group`` times.
    """
    plan: list[tuple[str, int, int, str, str | None]] = []
    background_names = [b.name for b in config.backgrounds]

    # 1. Train: planted background with probability background_strength, else a uniform other one;
    #    planted object with probability object_strength, independently (else, with other_object_rate, another
    #    class's planted object).
    for label, spec in enumerate(config.classes):
        others = [name for name in background_names if name != spec.background]
        for k in range(config.train_per_class):
            index = label * config.train_per_class + k
            rng = image_rng(seed, "train", index, STREAM_PLAN)
            on_planted = rng.random() < config.background_strength
            background = spec.background if on_planted else others[int(rng.integers(len(others)))]
            object_name = spec.object if rng.random() < config.object_strength else None
            others_objects = [c.object for c in config.classes if c.object != spec.object]
            if object_name is None and config.other_object_rate > 0 and others_objects \
                    and rng.random() < config.other_object_rate:
                object_name = others_objects[int(rng.integers(len(others_objects)))]
            plan.append(("train", index, label, background, object_name))

    # 2. Val/test: balanced over class x background x {without, with} the class's planted object.
    for split, per_group in (("val", config.val_per_group), ("test", config.test_per_group)):
        index = 0
        for label in range(len(config.classes)):
            for background in background_names:
                for has_object in (False, True):
                    for _ in range(per_group):
                        plan.append((split, index, label, background,
                                     config.classes[label].object if has_object else None))
                        index += 1
    return plan


def benchmark_spec(config: SynthConfig, seed: int) -> dict[str, object]:
    """The content of ``spec.json``: planted features per class, strengths, counts, groups and seed."""
    objects = {o.name: o for o in config.objects}
    backgrounds = {b.name: b for b in config.backgrounds}
    n_groups = 2 * len(config.classes) * len(config.backgrounds)
    return {
        "seed": seed,
        "image_size": config.image_size,
        "background_strength": config.background_strength,
        "object_strength": config.object_strength,
        "classes": [
            {
                "label": label,
                "name": spec.name,
                "shape": spec.shape,
                "words": list(spec.words),
                "background": {"name": spec.background, "words": list(backgrounds[spec.background].words)},
                "object": {"name": spec.object, "words": list(objects[spec.object].words)},
            }
            for label, spec in enumerate(config.classes)
        ],
        "counts": {
            "train_per_class": config.train_per_class,
            "val_per_group": config.val_per_group,
            "test_per_group": config.test_per_group,
            "train": config.train_per_class * len(config.classes),
            "val": config.val_per_group * n_groups,
            "test": config.test_per_group * n_groups,
        },
        "groups": group_names(config),
        "config": config.model_dump(mode="json"),
    }


def draw_benchmark(config: SynthConfig, out: Path, seed: int | None = None) -> list[Row]:
    """Draw the synthetic benchmark into ``out`` (image-folder layout) and return its manifest rows.

    Args:
        config: the benchmark config.
        out: output folder (created if missing; existing files of the same names are overwritten).
        seed: overrides ``config.seed`` when given.

    Returns:
        The rows of every split (train, val, test in that order), with the manifest columns plus
        ``group``, ``group_name``, ``caption``, ``objects``, ``boxes``, ``scene`` (the background's name), ``has_object``
        and ``source="synthetic"``. Paths are absolute.

    Raises:
        ValueError: the seed is negative.
    """
    # 1. Resolve the seed and the output folder (absolute, so paths lie under <out>/<split>).
    seed = config.seed if seed is None else seed
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(config, seed)
    logger.info("drawing %d synthetic images into %s (seed %d)", len(plan), out, seed)

    # 2. Draw every image from its own generator.
    rows: list[Row] = []
    for split, index, label, background, object_name in tqdm(plan, desc="synth", unit="img", disable=None):
        spec = config.classes[label]
        has_object = object_name == spec.object
        rng = image_rng(seed, split, index, STREAM_DRAW)
        image, boxes = draw_image(rng, config, label, background, object_name)
        caption = make_caption(rng, config, label, background, object_name)
        image_id = f"synth-{split}-{index:06d}"
        path = out / split / spec.name / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
        rows.append(
            {
                "image_id": image_id,
                "path": str(path),
                "label": label,
                "class_name": spec.name,
                "split": split,
                "group": group_index(config, label, background, has_object),
                "group_name": group_name(config, label, background, has_object),
                "caption": caption,
                "objects": [object_name] if object_name else [],
                "boxes": boxes,
                "scene": background,
                "has_object": has_object,
                "source": "synthetic",
            }
        )

    # 3. metadata.csv per split, then spec.json.
    for split in SPLIT_CODES:
        write_metadata_csv([row for row in rows if row["split"] == split], out / split)
    spec_text = json.dumps(benchmark_spec(config, seed), indent=2, sort_keys=True) + "\n"
    (out / "spec.json").write_text(spec_text, encoding="utf-8")
    logger.info("wrote %d images and spec.json to %s", len(rows), out)
    return rows


def draw_background_bank(config: SynthConfig, out: Path, seed: int | None = None) -> list[Path]:
    """Background-only images for the ``composite`` background editor and generator: ``<out>/<name>/<i>.png``,
    ``config.bank_per_background`` per background name (the editor falls back on a background that looks unlike
    the image's own when the bank has no folder named like the proposed alternative). Image ``i`` of a name does
    not depend on the bank's size.

    Returns:
        The folders written.
    """
    out = Path(out)
    seed = config.seed if seed is None else seed
    folders = []
    for b, spec in enumerate(config.backgrounds):
        folder = out / spec.name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(config.bank_per_background):
            rng = image_rng(seed, "train", b * BANK_INDICES_PER_BACKGROUND + i, stream=STREAM_BANK)
            Image.fromarray(draw_texture(rng, spec, config.image_size)).save(folder / f"{i:03d}.png")
        folders.append(folder)
    return folders


def planted_found(config: SynthConfig, spurious: dict[str, list[list[str]]]) -> dict[str, dict[str, bool]]:
    """Per class: whether its planted object and its planted background are among its top-k phrase groups.

    A group names a planted feature when one of its phrases, normalised, is the feature's name or one of its
    caption wordings (without the preposition: "in the snow" -> "snow")."""
    from aspire.phrases import normalize_phrase

    objects = {o.name: o for o in config.objects}
    backgrounds = {b.name: b for b in config.backgrounds}

    def forms(name: str, words: list[str], strip_preposition: bool) -> set[str]:
        texts = [name] + [" ".join(w.split()[1:]) if strip_preposition else w for w in words]
        return {normalize_phrase(t) for t in texts}

    result = {}
    for spec in config.classes:
        found = {normalize_phrase(p) for group in spurious.get(spec.name, []) for p in group}
        obj, bg = objects[spec.object], backgrounds[spec.background]
        result[spec.name] = {"object": bool(found & forms(obj.name, obj.words, False)),
                             "background": bool(found & forms(bg.name, bg.words, True))}
    return result


def draw_cue_probe(config: SynthConfig, per_cell: int = 8, seed: int = 0) -> tuple[list[Image.Image], list[tuple]]:
    """Images whose cues disagree, to see which cue a classifier follows: every class's core shape on every
    background, with no object or with each object, ``per_cell`` images per combination. The test split only
    pairs a class with its own object; here a penguin may stand beside the scooter's helmet on the hornet's hedge.

    Returns:
        The images and, per image, its cell ``(label, background name, object name or None)``.
    """
    cells = [(label, background.name, obj) for label in range(len(config.classes)) for background in config.backgrounds
             for obj in [None, *(o.name for o in config.objects)]]
    images, where = [], []
    for c, cell in enumerate(cells):
        for i in range(per_cell):
            image, _ = draw_image(image_rng(seed, "test", c * per_cell + i, stream=STREAM_PROBE), config, *cell)
            images.append(image)
            where.append(cell)
    return images, where


def cue_reliance(config: SynthConfig, cells: list[tuple], predicted: list[str]) -> dict[str, float | None]:
    """Which cue the predictions (class names, one per :func:`draw_cue_probe` image) follow.

    - ``shape``: the share predicted as the class whose core shape is drawn (the core feature), over all images;
    - ``background`` / ``object``: among images whose background / object is another class's planted one, the
      share predicted as that other class (the shortcut followed against the shape). None when no image has one.
    """
    names = [c.name for c in config.classes]
    background_of = {c.background: c.name for c in config.classes}
    object_of = {c.object: c.name for c in config.classes}
    shape, background, obj = [], [], []
    for (label, bg, ob), pred in zip(cells, predicted):
        shape.append(pred == names[label])
        if background_of.get(bg, names[label]) != names[label]:
            background.append(pred == background_of[bg])
        if ob is not None and object_of.get(ob, names[label]) != names[label]:
            obj.append(pred == object_of[ob])

    def share(hits: list[bool]) -> float | None:
        return round(sum(hits) / len(hits), 4) if hits else None

    return {"shape": share(shape), "background": share(background), "object": share(obj), "images": len(cells)}
