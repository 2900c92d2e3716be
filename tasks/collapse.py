"""Stage ``collapse`` (ASPIRE "Top-k selection"): group the phrases whose edits flipped predictions and keep
the k most frequent groups per class as the class's spurious features.

ASPIRE Sec. 2 "Top-k selection" and Table 4 (https://arxiv.org/abs/2308.10103); the grouping itself is
:func:`aspire.phrases.collapse_phrases`. Kept edits of the top-k groups are what personalization trains on.

A top-k group counts as a spurious feature only when enough of its edits flipped the prediction, in number
(``collapse.min_flips``) and in rate (``collapse.min_flip_rate``): a classifier that leans on nothing still
flips a few edits, and those must not be reported as features. Classes with no such group are listed in
``no_spurious_found``.

Columns added: ``spurious_group`` (0..k-1 on kept edits of a confident top-k group, else None).
"""

from __future__ import annotations

from collections import Counter, defaultdict

from aspire.config import CollapseConfig
from aspire.manifest import Row
from aspire.phrases import DEFAULT_THRESHOLDS, Embedder, make_embedder, top_k
from tasks.remove import is_edit

STAGE = "collapse"
VERSION = 2


def threshold_of(config: CollapseConfig) -> float:
    return config.threshold if config.threshold is not None else DEFAULT_THRESHOLDS[config.embedder]


def load_embedder(config: CollapseConfig) -> Embedder:
    return make_embedder(config.embedder, config.glove_path)


def flip_counts(rows: list[Row]) -> dict[str, dict[str, dict[str, int]]]:
    """Per class and phrase: how many edits were made and how many flipped the prediction."""
    counts: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for row in rows:
        if is_edit(row) and row.get("phrase") and row.get("skip_reason") is None:
            counts[row["class_name"]][row["phrase"]]["tried"] += 1
            counts[row["class_name"]][row["phrase"]]["kept"] += bool(row["kept"])
    return {c: {p: dict(n) for p, n in sorted(phrases.items(), key=lambda kv: -kv[1]["kept"])}
            for c, phrases in sorted(counts.items())}


def run_collapse(rows: list[Row], config: CollapseConfig, embedder: Embedder) -> tuple[list[Row], dict]:
    """Top-k groups per class from the kept edits; annotate the kept edits that belong to them.

    Returns:
        (rows with ``spurious_group``, summary with ``spurious`` {class: [[phrases], ...]}, ``top_k`` (with
        counts) and ``flipped`` (per phrase: edits made and kept)).
    """
    kept = [r for r in rows if is_edit(r) and r.get("kept") and r.get("phrase")]
    table = top_k([(r["class_name"], r["phrase"]) for r in kept], embedder, threshold_of(config), config.top_k)
    flipped = flip_counts(rows)
    for class_name, groups in table.items():
        for group in groups:
            group["tried"] = sum(flipped.get(class_name, {}).get(p, {}).get("tried", 0) for p in group["phrases"])
            group["flip_rate"] = round(group["count"] / group["tried"], 4) if group["tried"] else 0.0
            group["confident"] = group["count"] >= config.min_flips and group["flip_rate"] >= config.min_flip_rate
    spurious = {c: [g["phrases"] for g in groups if g["confident"]] for c, groups in table.items()}
    group_of = {(c, p): i for c, groups in spurious.items() for i, g in enumerate(groups) for p in g}
    out = [{**r, "spurious_group": group_of.get((r["class_name"], r.get("phrase"))) if is_edit(r) and r.get("kept")
            else None} for r in rows]
    classes = sorted({r["class_name"] for r in rows if not is_edit(r)})
    summary = {"rows_in": len(rows), "failures": 0, "edits_kept": len(kept),
               "spurious": {c: groups for c, groups in spurious.items() if groups},
               "no_spurious_found": [c for c in classes if not spurious.get(c)],
               "rule": f"a top-{config.top_k} group is a spurious feature when >= {config.min_flips} of its edits "
                       f"flipped the prediction and >= {config.min_flip_rate:.0%} of them did",
               "top_k": table, "flipped": flipped}
    return out, summary
