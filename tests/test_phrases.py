"""Phrase normalisation, collapsing (bow, minilm, glove), top-k and phrase scores."""

import json
from pathlib import Path

import numpy as np
import pytest

from aspire.phrases import (DEFAULT_THRESHOLDS, BowEmbedder, GloveEmbedder, MiniLMEmbedder, collapse_phrases,
                            make_embedder, normalize_phrase, phrase_root, phrase_scores, top_k)

DOGS = ["dog", "dogs", "two dogs", "husky dogs", "dog team"]


@pytest.fixture(scope="module")
def minilm():
    return MiniLMEmbedder()


def group_of(groups, phrase):
    return next(i for i, g in enumerate(groups) if phrase in g)


def test_normalize_and_root():
    assert normalize_phrase("Two Dogs") == "dogs" and normalize_phrase("a dog team") == "dog team"
    assert phrase_root("two dogs") == phrase_root("dog") == "dog"
    assert normalize_phrase("the") == "the"  # never empty


@pytest.mark.parametrize("name", ["bow", "minilm"])
def test_dog_phrases_collapse_and_snow_beach_stay_apart(name, minilm):
    embedder = minilm if name == "minilm" else BowEmbedder()
    phrases = DOGS * 2 + ["snow", "snow", "beach"]
    groups = collapse_phrases(phrases, embedder, DEFAULT_THRESHOLDS[name])
    assert sorted(groups[0]) == sorted(DOGS)
    assert {group_of(groups, "snow"), group_of(groups, "beach"), 0} == {0, 1, 2} and len(groups) == 3
    assert groups[1] == ["snow"]  # larger count first


def test_minilm_adds_semantic_merges_that_stems_miss(minilm):
    groups = collapse_phrases(["woman", "women", "young woman", "boat"], minilm, DEFAULT_THRESHOLDS["minilm"])
    assert group_of(groups, "women") == group_of(groups, "woman") != group_of(groups, "boat")
    bow_groups = collapse_phrases(["woman", "women"], BowEmbedder(), DEFAULT_THRESHOLDS["bow"])
    assert len(bow_groups) == 2  # "women" does not stem to "woman"


def test_table4_groups_are_recovered(minilm):
    """Pair F1 against the paper's own grouping stays at the calibrated level (BENCHMARKS.md)."""
    data = json.loads((Path(__file__).parent / "data" / "table4_groups.json").read_text())
    tp = fp = fn = 0
    for name, groups in data.items():
        if name.startswith("_"):
            continue
        phrases = [p for g in groups for p in g]
        gold = {p: i for i, g in enumerate(groups) for p in g}
        found = {p: i for i, g in enumerate(collapse_phrases(phrases, minilm, 0.65)) for p in g}
        for i, a in enumerate(phrases):
            for b in phrases[i + 1:]:
                tp += gold[a] == gold[b] and found[a] == found[b]
                fp += gold[a] != gold[b] and found[a] == found[b]
                fn += gold[a] == gold[b] and found[a] != found[b]
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    # 0.91 / 0.83 measured (BENCHMARKS.md); the "false" merges are mostly "snow" with "snowy hill", which the
    # paper's text asks for and its Table 4 happens to keep apart
    assert precision >= 0.9 and recall >= 0.8


def test_top_k_counts_and_limits():
    records = [("dog sled", p) for p in DOGS * 3] + [("dog sled", "snow")] * 4 + [("dog sled", "tree")] + \
              [("dog sled", "man")] * 2 + [("cat", "sofa")]
    result = top_k(records, BowEmbedder(), 0.5, k=3)
    assert [g["count"] for g in result["dog sled"]] == [15, 4, 2]
    assert result["dog sled"][1]["phrases"] == ["snow"] and result["cat"] == [{"phrases": ["sofa"], "count": 1}]


def test_glove_embedder_reads_only_needed_words(tmp_path):
    vectors = {"dog": [1, 0, 0], "dogs": [0.95, 0.1, 0], "puppy": [0.9, 0.2, 0.1], "snow": [0, 0, 1]}
    path = tmp_path / "glove.txt"
    path.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in vectors.items()) + "unused 1 1 1\n")
    glove = make_embedder("glove", path)
    embedded = glove.embed(["puppy", "dog"])
    assert embedded.shape == (2, 3) and "unused" not in glove.vectors
    assert float(embedded[0] @ embedded[1]) > 0.9
    groups = collapse_phrases(["dog", "puppy", "snow"], glove, 0.9)
    assert group_of(groups, "puppy") == group_of(groups, "dog") != group_of(groups, "snow")
    with pytest.raises(FileNotFoundError, match="collapse.glove_path"):
        GloveEmbedder(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="needs collapse.glove_path"):
        make_embedder("glove")


def test_bad_threshold_and_empty_input():
    with pytest.raises(ValueError, match="threshold=0"):
        collapse_phrases(["a"], BowEmbedder(), 0)
    assert collapse_phrases(["", "  "], BowEmbedder(), 0.5) == []
    assert np.allclose(np.linalg.norm(BowEmbedder().embed(["dog team", "snow"]), axis=1), 1)


def test_phrase_scores():
    scores = phrase_scores([["man", "two dogs"], ["keyboard"]], [["a man", "dog"], ["keyboard", "mouse"]])
    assert scores == {"precision": 0.5, "recall": 2 / 3, "f1": pytest.approx(4 / 7)}
