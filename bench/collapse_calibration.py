"""Calibrate phrase-collapsing thresholds against the paper's own groups (ASPIRE Table 4).

Usage: .venv/bin/python bench/collapse_calibration.py

For each class, all phrases of its Table 4 groups are collapsed together; pairwise precision / recall /
F1 of "same group" decisions against the paper's grouping is reported per embedder and threshold.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

from aspire.phrases import BowEmbedder, MiniLMEmbedder, collapse_phrases

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "table4_groups.json"


def pair_scores(truth: dict[str, list[list[str]]], embedder, threshold: float) -> dict[str, float]:
    tp = fp = fn = 0
    for groups in truth.values():
        phrases = [p for g in groups for p in g]
        gold = {p: i for i, g in enumerate(groups) for p in g}
        found = {p: i for i, g in enumerate(collapse_phrases(phrases, embedder, threshold)) for p in g}
        for a, b in itertools.combinations(phrases, 2):
            same_gold, same_found = gold[a] == gold[b], found[a] == found[b]
            tp += same_gold and same_found
            fp += same_found and not same_gold
            fn += same_gold and not same_found
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / max(precision + recall, 1e-9)}


def main() -> None:
    truth = {k: v for k, v in json.loads(DATA.read_text()).items() if not k.startswith("_")}
    start = time.perf_counter()
    minilm = MiniLMEmbedder()
    print(f"minilm load {time.perf_counter() - start:.1f} s")
    print("| embedder | threshold | pair precision | pair recall | pair F1 |\n|---|---|---|---|---|")
    for name, embedder, thresholds in (("bow", BowEmbedder(), (0.4, 0.5, 0.6, 0.7, 0.8)),
                                       ("minilm (+stems 0.5)", minilm, (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9))):
        for t in thresholds:
            s = pair_scores(truth, embedder, t)
            print(f"| {name} | {t} | {s['precision']:.2f} | {s['recall']:.2f} | {s['f1']:.2f} |")


if __name__ == "__main__":
    main()
