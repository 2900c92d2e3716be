"""Per-phrase against joint grounding (``remove.grounding``): seconds per image and how the boxes differ.

Usage: HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/grounding_modes.py [--images 30]   (the tiny model comes from the tests)

Runs the transformers Grounding DINO backend, a tiny random-weight model built as the tests build it (nothing is
downloaded), on synthetic benchmark images with each image's phrases (its annotated objects and its background),
once with one prompt per phrase (ASPIRE's Algorithm 1, the default) and once with all phrases in one prompt.
Reports seconds per image, forward passes, boxes per phrase, and for each phrase the IoU of its best-scoring box
in the two modes. Random weights make the boxes themselves meaningless; the comparison shows how much the joint
prompt changes what a phrase gets (the other phrases share its attention), and what per-phrase costs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from aspire.config import RemoveConfig
from aspire.synth import SynthConfig, draw_benchmark
from tasks.grounders import HFGroundingDino
from tests.test_grounders import save_tiny_hf_grounding_dino


def iou(a: list[float], b: list[float]) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def best_boxes(detections) -> dict[str, list[float]]:
    best: dict[str, tuple[float, list[float]]] = {}
    for d in detections:
        if d.phrase not in best or d.score > best[d.phrase][0]:
            best[d.phrase] = (d.score, list(d.box))
    return {phrase: box for phrase, (_, box) in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="aspire-grounding-bench-"))
    rows = [r for r in draw_benchmark(SynthConfig(train_per_class=args.images // 3 + 1), work / "bench")
            if r["split"] == "train"][: args.images]
    model = save_tiny_hf_grounding_dino(work / "gdino")
    items = [(Image.open(r["path"]).convert("RGB").resize((128, 128)),
              [b["phrase"] for b in r["boxes"]] + [r["scene"]]) for r in rows]
    results, timings = {}, {}
    for mode in ("per-phrase", "joint"):
        grounder = HFGroundingDino(RemoveConfig(ground="hf-grounding-dino", ground_model=str(model), grounding=mode,
                                                box_threshold=0.0, text_threshold=0.0, device="cpu"))
        grounder.ground(*items[0], {})  # warm-up
        grounder.forward_calls = 0
        start = time.perf_counter()
        results[mode] = [grounder.ground(image, phrases, {}) for image, phrases in items]
        timings[mode] = (time.perf_counter() - start, grounder.forward_calls)
    phrases = sum(len(p) for _, p in items)
    ious, missing = [], 0
    for per_phrase, joint in zip(results["per-phrase"], results["joint"]):
        a, b = best_boxes(per_phrase), best_boxes(joint)
        for phrase in a.keys() | b.keys():
            if phrase in a and phrase in b:
                ious.append(iou(a[phrase], b[phrase]))
            else:
                missing += 1
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; "
          f"{len(items)} images of 128 px, {phrases} phrases ({phrases / len(items):.1f} per image)")
    print("| mode | s per image | forward passes | boxes per phrase |")
    print("|---|---|---|---|")
    for mode, (seconds, calls) in timings.items():
        boxes = sum(len(d) for d in results[mode])
        print(f"| {mode} | {seconds / len(items):.4f} | {calls} | {boxes / phrases:.2f} |")
    print(f"best box per phrase, per-phrase vs joint: mean IoU {statistics.mean(ious):.3f}, IoU >= 0.5 for "
          f"{sum(i >= 0.5 for i in ious) / len(ious):.0%} of {len(ious)} phrases, identical for "
          f"{sum(i > 0.999 for i in ious) / len(ious):.0%}; a box in one mode only: {missing}")


if __name__ == "__main__":
    main()
