"""Extraction quality on the labelled captions in tests/data/extract_labelled.jsonl.

Usage: .venv/bin/python bench/extract_quality.py [--backend rules|openai] [--set extract.model=gpt-4o ...]

Foreground phrases are scored by micro precision / recall / F1 after normalisation (determiners and counts
dropped); the background by exact match. The ``openai`` backend needs OPENAI_API_KEY (and OPENAI_BASE_URL
for a local server); it is not measurable on the offline development machines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from aspire.config import ExtractConfig, apply_overrides
from aspire.phrases import normalize_phrase, phrase_scores
from tasks.extract import CaptionCache, load_extractor, run_extract

LABELLED = Path(__file__).resolve().parents[1] / "tests" / "data" / "extract_labelled.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="rules", choices=["rules", "openai"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    data = apply_overrides({"extract": {"backend": args.backend}}, args.overrides)
    config = ExtractConfig.model_validate(data["extract"])
    items = [json.loads(line) for line in LABELLED.read_text().splitlines()]
    rows = [{"image_id": str(i), "class_name": it["label"], "caption": it["caption"]} for i, it in enumerate(items)]
    start = time.perf_counter()
    result = run_extract(rows, config, load_extractor(config), CaptionCache(Path(tempfile.mkdtemp())))
    seconds = time.perf_counter() - start
    scores = phrase_scores([it["foreground"] for it in items], [r["foreground"] for r in result.rows])
    background = sum(normalize_phrase(r["background"]) == normalize_phrase(it["background"])
                     for r, it in zip(result.rows, items)) / len(items)
    print(f"backend {args.backend}: {len(items)} captions in {seconds:.2f} s, failures {result.stats['failed']}")
    print(f"foreground precision {scores['precision']:.2f} recall {scores['recall']:.2f} f1 {scores['f1']:.2f}; "
          f"background accuracy {background:.2f}")


if __name__ == "__main__":
    main()
