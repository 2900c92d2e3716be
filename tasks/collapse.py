"""Stage ``collapse`` (ASPIRE "Top-k selection"): group the phrases whose edits flipped predictions and keep
the k most frequent groups per class as the class's spurious features.

ASPIRE Sec. 2 "Top-k selection" and Table 4 (https://arxiv.org/abs/2308.10103); the grouping itself is
:func:`aspire.phrases.collapse_phrases`. Kept edits of the top-k groups are what personalization trains on.

A top-k group counts as a spurious feature only when enough of its edits flipped the prediction, in number
(``collapse.min_flips``) and in rate (``collapse.min_flip_rate``): a classifier that leans on nothing still
flips a few edits, and those must not be reported as features. And a spurious *correlation* is one of the data:
the feature must be named by the class's captions at least ``collapse.min_lift`` times as often as by the other
classes' (what a classifier leans on without such a correlation, say an undertrained model's taste for snow when
every class is as often on snow, is the model's error, not a shortcut the data taught that augmentation fixes).
Classes with no such group are listed in ``no_spurious_found``.

Columns added: ``spurious_group`` (0.. on kept edits of a claimed top-k group, else None: what the report claims)
and ``top_k_group`` (0..k-1 on kept edits of any top-k group, else None: what ASPIRE's generator learns from,
Algorithm 1's D_synth^k, whether or not the report claims the group).
"""

from __future__ import annotations

from collections import Counter, defaultdict

from aspire.config import CollapseConfig
from aspire.manifest import Row
from aspire.phrases import DEFAULT_THRESHOLDS, Embedder, make_embedder, phrase_root, top_k
from tasks.remove import is_edit

STAGE = "collapse"
VERSION = 4


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


def caption_mentions(rows: list[Row]) -> list[tuple[str, list[set[str]]]]:
    """Per held-out original with an extraction: its class and the stemmed words of each phrase extracted from its
    caption (foreground and background)."""
    out = []
    for row in rows:
        if not is_edit(row) and row.get("extract_error") is None and "foreground" in row:
            phrases = [p for p in [*row["foreground"], row.get("background") or ""] if p]
            out.append((row["class_name"], [set(phrase_root(p).split()) for p in phrases]))
    return out


def mention_rates(mentions: list[tuple[str, list[set[str]]]], phrases: list[str], class_name: str) -> tuple[float, float]:
    """Fraction of the class's held-out originals (:func:`caption_mentions`) that name one of ``phrases`` (the
    stemmed words of one hold the other's: "snowy field" names "snow"), and the same fraction over the other
    classes' originals."""
    roots = [set(phrase_root(p).split()) for p in phrases]
    inside = outside = n_inside = n_outside = 0
    for row_class, mentioned in mentions:
        named = any(a and b and (a <= b or b <= a) for a in roots for b in mentioned)
        if row_class == class_name:
            n_inside, inside = n_inside + 1, inside + named
        else:
            n_outside, outside = n_outside + 1, outside + named
    return (inside / n_inside if n_inside else 0.0), (outside / n_outside if n_outside else 0.0)


def run_collapse(rows: list[Row], config: CollapseConfig, embedder: Embedder) -> tuple[list[Row], dict]:
    """Top-k groups per class from the kept edits; annotate the kept edits that belong to them.

    Returns:
        (rows with ``spurious_group`` and ``top_k_group``, summary with ``spurious`` {class: [[phrases], ...]},
        ``top_k`` (with counts) and ``flipped`` (per phrase: edits made and kept)).
    """
    kept = [r for r in rows if is_edit(r) and r.get("kept") and r.get("phrase")]
    table = top_k([(r["class_name"], r["phrase"]) for r in kept], embedder, threshold_of(config), config.top_k)
    flipped, mentions = flip_counts(rows), caption_mentions(rows)
    for class_name, groups in table.items():
        for group in groups:
            group["tried"] = sum(flipped.get(class_name, {}).get(p, {}).get("tried", 0) for p in group["phrases"])
            group["flip_rate"] = round(group["count"] / group["tried"], 4) if group["tried"] else 0.0
            inside, outside = mention_rates(mentions, group["phrases"], class_name)
            group["mentioned"], group["mentioned_elsewhere"] = round(inside, 4), round(outside, 4)
            group["lift"] = round(inside / max(outside, 1e-3), 2)
            group["confident"] = (group["count"] >= config.min_flips and group["flip_rate"] >= config.min_flip_rate
                                  and group["lift"] >= config.min_lift)
    spurious = {c: [g["phrases"] for g in groups if g["confident"]] for c, groups in table.items()}
    group_of = {(c, p): i for c, groups in spurious.items() for i, g in enumerate(groups) for p in g}
    top_of = {(c, p): i for c, groups in table.items() for i, g in enumerate(groups) for p in g["phrases"]}

    def kept_in(groups: dict, row: Row) -> int | None:
        return groups.get((row["class_name"], row.get("phrase"))) if is_edit(row) and row.get("kept") else None

    out = [{**r, "spurious_group": kept_in(group_of, r), "top_k_group": kept_in(top_of, r)} for r in rows]
    classes = sorted({r["class_name"] for r in rows if not is_edit(r)})
    summary = {"rows_in": len(rows), "failures": 0, "edits_kept": len(kept),
               "spurious": {c: groups for c, groups in spurious.items() if groups},
               "no_spurious_found": [c for c in classes if not spurious.get(c)],
               "rule": f"a top-{config.top_k} group is a spurious feature when >= {config.min_flips} of its edits "
                       f"flipped the prediction, >= {config.min_flip_rate:.0%} of them did, and the class's captions "
                       f"name it >= {config.min_lift:g}x as often as the other classes' do",
               "top_k": table, "flipped": flipped}
    return out, summary


def training_edits(rows: list[Row], class_name: str, min_images: int) -> tuple[list[Row], str, str]:
    """The kept edits a class's generator learns from: one rule for textual inversion (``personalize``) and its CPU
    stand-in (the composite generator), so that both give images to the same classes.

    1. ``top-k``: the class's kept edits in one of its top-k groups (``top_k_group`` set: ASPIRE Algorithm 1's
       D_synth^k, whether or not the report claims the group: a class whose features are redundant, each enough
       for the prediction alone, flips few single edits and may claim nothing; leaving it, or one of its features,
       out of the augmentation while the other classes are shown on every background would teach the retrained
       model that those backgrounds mean "not this class"), when there are at least ``min_images``;
    2. ``all-kept``: otherwise all its kept edits, when there are at least ``min_images``;
    3. ``none``: otherwise none, with the reason ``"only N kept edits (< min_images)"``.

    Returns:
        (edit rows in manifest order, one per edited file; the rule; a reason for the summary).

    Raises:
        ValueError: ``min_images`` below 1.
    """
    if min_images < 1:
        raise ValueError(f"personalize.min_images={min_images}: expected at least 1")
    kept, seen = [], set()
    for r in rows:
        if r.get("class_name") == class_name and r.get("kept") and r.get("path") and is_edit(r) and r["path"] not in seen:
            seen.add(r["path"])
            kept.append(r)
    top = [r for r in kept if r.get("top_k_group") is not None]
    if len(top) >= min_images:
        return top, "top-k", f"{len(top)} kept edits of the top-k groups"
    if len(kept) >= min_images:
        return kept, "all-kept", (f"only {len(top)} kept edits of the top-k groups (< min_images); all "
                                  f"{len(kept)} kept edits of the class")
    return [], "none", f"only {len(kept)} kept edits (< min_images)"
