"""Images per second of the remove stage per backend set, on the synthetic benchmark.

Usage: .venv/bin/python bench/remove_throughput.py [--images 120] [--sam-images 4]

Weight-free sets run on ``--images`` held-out-like benchmark images (captions -> rules extraction ->
remove). The segment-anything set uses a full-size ``vit_b`` with random weights (same speed as trained
weights; nothing downloaded) on ``--sam-images`` images, and counts image-encoder calls against images and
objects. Re-classification uses a small random CNN in every set, so the numbers compare the editing work.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from aspire.classifier import build_model
from aspire.config import ClassifierConfig, ExtractConfig, RemoveConfig
from aspire.synth import SynthConfig, draw_benchmark
from tasks.extract import CaptionCache, run_extract
from tasks.extract_rules import RulesExtractor
from tasks.grounders import AnnotationsGrounder
from tasks.inpainters import OpenCVInpainter
from tasks.remove import run_remove
from tasks.segmenters import BoxSegmenter, GrabCutSegmenter, SamSegmenter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--sam-images", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aspire-remove-bench-"))
    (work / "out").mkdir()
    rows = [r for r in draw_benchmark(SynthConfig(train_per_class=args.images // 3 + 1), work / "bench")
            if r["split"] == "train"][: args.images]
    extract_config = ExtractConfig(backend="rules", synonyms={"dog": ["husky"]})
    rows = run_extract(rows, extract_config, RulesExtractor(extract_config), CaptionCache(work / "cache")).rows
    classifier_config = ClassifierConfig(arch="small-cnn", image_size=64, device="cpu")
    classifier = (build_model(classifier_config, 3).eval(), classifier_config, ["dog", "bird", "car"])
    objects = sum(len(r["foreground"]) for r in rows)
    print(f"machine: {platform.node()} {platform.machine()}, {torch.get_num_threads()} threads, "
          f"date {time.strftime('%Y-%m-%d')}; {len(rows)} images, {objects} foreground phrases")
    print("| backend set | images | seconds | images/s | edits tried |\n|---|---|---|---|---|")
    config = RemoveConfig(ground="annotations", segment="box", inpaint="opencv", batch_size=32)
    for name, segmenter in (("annotations + box + opencv", BoxSegmenter()),
                            ("annotations + grabcut + opencv", GrabCutSegmenter())):
        start = time.perf_counter()
        result = run_remove(rows, config, AnnotationsGrounder(), segmenter, OpenCVInpainter(config), classifier,
                            work / "out")
        seconds = time.perf_counter() - start
        print(f"| {name} | {len(rows)} | {seconds:.2f} | {len(rows) / seconds:.1f} | {result.stats['edits_tried']} |")

    # segment-anything vit_b, random weights, saved and loaded through the real loading code
    from segment_anything import sam_model_registry

    checkpoint = work / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), checkpoint)
    sam_config = RemoveConfig(ground="annotations", segment="sam", sam_model_type="vit_b", sam_checkpoint=checkpoint,
                              inpaint="opencv", device="cpu")
    segmenter = SamSegmenter(sam_config)
    few = rows[: args.sam_images]
    start = time.perf_counter()
    run_remove(few, sam_config, AnnotationsGrounder(), segmenter, OpenCVInpainter(sam_config), classifier, work / "out")
    seconds = time.perf_counter() - start
    boxes = sum(len(r["boxes"]) - 1 for r in few)  # planted objects (the class box is never removed)
    print(f"| annotations + sam vit_b (random) + opencv | {len(few)} | {seconds:.2f} | {len(few) / seconds:.2f} | - |")
    print(f"\nSAM image-encoder calls: {segmenter.encoder_calls} for {len(few)} images, "
          f"{sum(len(r['foreground']) for r in few)} phrases, {boxes} object boxes")


if __name__ == "__main__":
    main()
