"""How well the GrabCut segmenter (the weight-free stand-in for SAM) masks each suite draw's core shapes.

Usage: .venv/bin/python bench/grabcut_masks.py [--images 300] [--draws d05_six_classes,...]

Per draw of ``configs/suite/`` (the demo's synth settings with the draw's merged in, as the suite does), ``--images``
images of random class and background, half of them with the class's object (drawn by
:func:`aspire.synth.draw_image`). The core shape's box and the object's are segmented by
``tasks.segmenters.GrabCutSegmenter`` and scored by IoU with the exact mask of what is visible of each: the pixels
that change when the same image (same random stream) is drawn again with that shape in its colour's complement.
Prints mean IoU per draw (core shapes, objects) and the core shapes' per background, the one they sit on.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import yaml

from aspire.synth import SynthConfig, draw_image
from tasks.segmenters import GrabCutSegmenter

REPO = Path(__file__).resolve().parents[1]


def draw_config(path: Path) -> SynthConfig:
    """A suite draw's synth settings: the demo's with the draw's ``synth`` section merged in (as the suite does)."""
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["synth"]
    return SynthConfig.model_validate({**demo, **(yaml.safe_load(path.read_text()) or {}).get("synth", {})})


def exact_mask(config: SynthConfig, seed: int, label: int, background: str, obj: str | None, of_object: bool) -> np.ndarray:
    """The visible pixels of the core shape (or of the object): those that differ when it is drawn in its colour's
    complement."""
    first, _ = draw_image(np.random.default_rng(seed), config, label, background, obj)
    if of_object:
        objects = [o.model_copy(update={"color": [255 - c for c in o.color]}) if o.name == obj else o for o in config.objects]
        recoloured = config.model_copy(update={"objects": objects})
    else:
        classes = [c.model_copy(update={"color": [255 - v for v in c.color]}) if i == label else c
                   for i, c in enumerate(config.classes)]
        recoloured = config.model_copy(update={"classes": classes})
    second, _ = draw_image(np.random.default_rng(seed), recoloured, label, background, obj)
    return np.abs(np.asarray(first, int) - np.asarray(second, int)).max(-1) > 0


def score(config: SynthConfig, images: int) -> tuple[dict[str, list[float]], list[float]]:
    """IoU of GrabCut's masks with the exact ones: the core shapes' per background, and the objects'."""
    rng, segmenter, cores, objects = np.random.default_rng(0), GrabCutSegmenter(), {}, []

    def iou(mask: np.ndarray, truth: np.ndarray) -> float:
        return float((mask & truth).sum() / max(1, (mask | truth).sum()))

    for i in range(images):
        label = int(rng.integers(len(config.classes)))
        background = config.backgrounds[int(rng.integers(len(config.backgrounds)))].name
        obj = config.classes[label].object if rng.random() < 0.5 else None
        image, boxes = draw_image(np.random.default_rng(1000 + i), config, label, background, obj)
        masks = segmenter.segment(image, [b["box"] for b in boxes])
        cores.setdefault(background, []).append(iou(masks[0], exact_mask(config, 1000 + i, label, background, obj, False)))
        if obj is not None:
            objects.append(iou(masks[1], exact_mask(config, 1000 + i, label, background, obj, True)))
    return cores, objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--draws", default="", help="comma-separated draw names (default: every file of configs/suite)")
    args = parser.parse_args()
    draws = sorted((REPO / "configs" / "suite").glob("*.yaml"))
    if args.draws:
        draws = [d for d in draws if d.stem in args.draws.split(",")]
    print(f"{platform.node()} {time.strftime('%Y-%m-%d')}: {GrabCutSegmenter().identity}, {args.images} images per draw")
    print("| draw | core shapes: mean IoU | objects: mean IoU | core shapes per background |\n|---|---|---|---|")
    for path in draws:
        cores, objects = score(draw_config(path), args.images)
        everything = [v for values in cores.values() for v in values]
        per = ", ".join(f"{name} {np.mean(values):.2f}" for name, values in sorted(cores.items()))
        print(f"| {path.stem} | {np.mean(everything):.3f} | {np.mean(objects):.3f} | {per} |")


if __name__ == "__main__":
    main()
