"""Stage ``collapse`` (ASPIRE "Top-k selection"): group the phrases whose edits flipped predictions and keep
the k most frequent groups per class as the class's spurious features.

ASPIRE Sec. 2 "Top-k selection" and Table 4 (https://arxiv.org/abs/2308.10103); the grouping itself is
:func:`aspire.phrases.collapse_phrases`. Kept edits of the top-k groups are what personalization trains on.

Columns added: ``spurious_group`` (0..k-1 on kept edits of a top-k group, else None).
"""

from __future__ import annotations

from collections import Counter, defaultdict

from aspire.config import CollapseConfig
from aspire.manifest import Row
from aspire.phrases import DEFAULT_THRESHOLDS, Embedder, make_embedder, top_k
from tasks.remove import is_edit

STAGE = "collapse"
VERSION = 1


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
    group_of = {(c, p): i for c, groups in table.items() for i, g in enumerate(groups) for p in g["phrases"]}
    out = [{**r, "spurious_group": group_of.get((r["class_name"], r.get("phrase"))) if is_edit(r) and r.get("kept")
            else None} for r in rows]
    summary = {"rows_in": len(rows), "failures": 0, "edits_kept": len(kept),
               "spurious": {c: [g["phrases"] for g in groups] for c, groups in table.items()},
               "top_k": table, "flipped": flip_counts(rows)}
    return out, summary
