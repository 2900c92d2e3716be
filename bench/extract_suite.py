"""The rules extractor on the captions of every suite draw (their words are in no prompt, list or code file).

Usage: .venv/bin/python bench/extract_suite.py [--root DIR]

Draws each benchmark of ``configs/suite/`` (train split only, small images: captions do not depend on pixels)
and scores, per caption, whether the extracted background names the planted scene and whether the foreground
holds the image's object (or none when it has none), without naming the class.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml

from aspire.config import ExtractConfig
from aspire.phrases import normalize_phrase
from aspire.synth import SynthConfig, draw_benchmark
from tasks.extract import label_forms, names_label
from tasks.extract_rules import RulesExtractor

REPO = Path(__file__).resolve().parents[1]


def score(config: SynthConfig, out: Path, extractor: RulesExtractor) -> dict[str, float]:
    rows = [r for r in draw_benchmark(config, out) if r["split"] == "train"]
    objects = {o.name: {normalize_phrase(w) for w in o.words} for o in config.objects}
    scenes = {b.name: {normalize_phrase(w.split(" ", 1)[1]) for w in b.words} for b in config.backgrounds}
    background_ok = object_ok = 0
    for row in rows:
        result = extractor.extract_one(row["caption"])
        foreground = [p for p in result.foreground if not names_label(p, label_forms(row["class_name"]))]
        got = {normalize_phrase(p) for p in foreground}
        background_ok += normalize_phrase(result.background) in scenes[row["scene"]]
        want = set().union(*(objects[o] for o in row["objects"])) if row["objects"] else set()
        object_ok += bool(got & want) if want else not got
    return {"captions": len(rows), "background": background_ok / len(rows), "object": object_ok / len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(tempfile.mkdtemp(prefix="aspire-extract-suite-")))
    args = parser.parse_args()
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["synth"]
    extractor = RulesExtractor(ExtractConfig(backend="rules"))
    print("| draw | captions | background correct | object (or none) correct |\n|---|---|---|---|")
    for draw in sorted((REPO / "configs" / "suite").glob("*.yaml")):
        synth = {**demo, **(yaml.safe_load(draw.read_text()) or {}).get("synth", {}), "image_size": 32}
        result = score(SynthConfig(**synth), args.root / draw.stem, extractor)
        print(f"| {draw.stem} | {result['captions']} | {result['background']:.3f} | {result['object']:.3f} |")


if __name__ == "__main__":
    main()
