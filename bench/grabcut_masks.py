"""How well the GrabCut segmenter (the weight-free stand-in for SAM) masks each suite draw's core shapes.

Usage: .venv/bin/python bench/grabcut_masks.py [--images 300] [--draws d05_six_classes,...]

Per draw of ``configs/suite/`` (the demo's synth settings for a draw without a ``synth`` section), ``--images``
images of random class, background and object (drawn by :func:`aspire.synth.draw_image`), the core shape's box
segmented by ``tasks.segmenters.GrabCutSegmenter``, scored by IoU with the shape's exact mask. The exact mask is
the set of pixels that change when the same image (same random stream) is drawn again with the core shape in
another colour. Prints mean IoU per draw and per background, the background a shape is segmented on.
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
    """A suite draw's synth settings: its own ``synth`` section, else the demo's."""
    section = yaml.safe_load(path.read_text()).get("synth")
    if section is None:
        section = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["synth"]
    return SynthConfig.model_validate(section)


def core_mask(config: SynthConfig, seed: int, label: int, background: str, obj: str | None) -> np.ndarray:
    """The core shape's exact mask: pixels that differ when the shape is drawn in its colour's complement."""
    classes = list(config.classes)
    first, _ = draw_image(np.random.default_rng(seed), config, label, background, obj)
    colour = [255 - c for c in classes[label].color]
    classes[label] = classes[label].model_copy(update={"color": colour})
    second, _ = draw_image(np.random.default_rng(seed), config.model_copy(update={"classes": classes}), label, background, obj)
    return np.abs(np.asarray(first, int) - np.asarray(second, int)).max(-1) > 0


def score(config: SynthConfig, images: int) -> dict[str, list[float]]:
    """IoU of GrabCut's mask with the exact one, per background."""
    rng, segmenter, found = np.random.default_rng(0), GrabCutSegmenter(), {}
    for i in range(images):
        label = int(rng.integers(len(config.classes)))
        background = config.backgrounds[int(rng.integers(len(config.backgrounds)))].name
        obj = config.classes[label].object if rng.random() < 0.5 else None
        image, boxes = draw_image(np.random.default_rng(1000 + i), config, label, background, obj)
        truth = core_mask(config, 1000 + i, label, background, obj)
        mask = segmenter.segment(image, [boxes[0]["box"]])[0]
        found.setdefault(background, []).append(float((mask & truth).sum() / max(1, (mask | truth).sum())))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--draws", default="", help="comma-separated draw names (default: every file of configs/suite)")
    args = parser.parse_args()
    draws = sorted((REPO / "configs" / "suite").glob("*.yaml"))
    if args.draws:
        draws = [d for d in draws if d.stem in args.draws.split(",")]
    print(f"{platform.node()} {time.strftime('%Y-%m-%d')}: {GrabCutSegmenter().identity}, {args.images} images per draw")
    print("| draw | mean IoU | per background |\n|---|---|---|")
    for path in draws:
        found = score(draw_config(path), args.images)
        everything = [v for values in found.values() for v in values]
        per = ", ".join(f"{name} {np.mean(values):.2f}" for name, values in sorted(found.items()))
        print(f"| {path.stem} | {np.mean(everything):.3f} | {per} |")


if __name__ == "__main__":
    main()
