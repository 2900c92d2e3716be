"""CLARIFY: correct a model from a person's short description of its errors (Lee et al., "Clarify: Improving Model
Robustness With Natural Language Corrections", seed paper 004, Sec. 3-4).

1. A person looks at one class's validation images split into correct and wrong predictions of the reference model
   and completes "The model is often wrong on images that have ___" (``aspire clarify CONFIG``).
2. The **error score** of a phrase T: with sim(I, T) the similarity of every validation image of the class to T,

       Acc(tau) = 1/2 [ P(sim > tau | error) + P(sim <= tau | correct) ],   score = 2 (max_tau Acc(tau) - 0.5),

   0 for a phrase that says nothing about the errors, 1 for one that separates them perfectly. A phrase may name
   an absence ("no sled": minus the similarity to "sled"), since a score that rewards only sim > tau on the errors
   cannot describe a class that fails where its usual object is missing. tau is the
   maximising threshold unless the person sets it. One annotation is (class, phrase, tau); per class the best one is
   kept. A class may carry *follow-up* annotations (``retrain.clarify_phrases`` above 1, not in the paper): the
   person looks at the errors the earlier phrases do not cover (images with sim <= tau for every earlier phrase of
   the class) and completes "The model is also often wrong on images that have ___", scored on those images only;
   for classes with more than one spurious attribute ("shortcuts come in multiples", Li et al. 2022b, cited by the
   paper), where one phrase balances one attribute and leaves the other's rare combinations rare.
3. The class's training rows split into D> (sim > tau) and D<= (sim <= tau); **slice-balanced** training weighs them
   by Eq. 2, w_i = 1 / (C |D>|) or 1 / (C |D<=|), so both slices of an annotated class weigh the same in total; rows
   of classes without an annotation keep uniform weights. With m annotations of a class its slices are the (up to 2^m)
   combinations of above / below each tau, each weighing the same. Here the weights are scaled so that every class keeps its
   original total weight (its row count) and the mean weight is 1: an annotated class's two slices each get half of
   it. The paper trains the last layer on a frozen backbone (``mode: last-layer``, features L2-normalised); ``full``
   fine-tunes the whole model with the same weights. **worst-slice** trains with Group DRO over the slices instead.
4. Model selection uses no group labels: the validation slices (the same rule on validation images) are the groups
   whose worst accuracy picks the C of the last layer or the best epoch.

Similarity backends: ``clip`` (CLIP image-text cosine, the paper's), and for the CPU world ``caption-bow`` /
``caption-minilm``, the phrase against each image's caption. On the synthetic benchmark the captions name the planted
object and background exactly, so caption matching there is close to an oracle of the spurious attribute: its
numbers measure the training half of CLARIFY, not how well a similarity model finds the slices.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from sklearn.linear_model import LogisticRegression
from torch import nn

from aspire.classifier import build_model, fit, load_model, predict_rows
from aspire.config import ClassifierConfig
from aspire.images import load_rgb
from aspire.manifest import Row
from aspire.phrases import BowEmbedder, Embedder, MiniLMEmbedder
from aspire.robust.base import Trainer, TrainResult, check_rows, num_classes
from aspire.robust.dfr import embed, linear_head, per_class_logits, strip_head
from aspire.robust.erm import ERMTrainer
from aspire.robust.group_dro import GroupDROTrainer

log = logging.getLogger(__name__)

SIMILARITIES = ("caption-bow", "caption-minilm", "clip")
MAX_TERMS = 4
"""The simulated person's longest phrase: at most this many comma-separated terms ("water, lake, sea")."""
SELECTION = "worst validation-slice accuracy (slices from the annotations; no group labels)"


# -- similarity ------------------------------------------------------------------------------------------------

NEGATIONS = ("no ", "without ")
"""A phrase starting with one of these describes an absence: "no sled" scores minus the similarity to "sled"."""


def absent_part(phrase: str) -> str | None:
    """The described-as-absent phrase of "no sled" / "without a sled" ("sled" / "a sled"), else None."""
    low = phrase.strip().lower()
    return next((phrase.strip()[len(n):].strip() for n in NEGATIONS if low.startswith(n) and low[len(n):].strip()), None)


def with_absences(phrases: Sequence[str]) -> list[str]:
    """``phrases`` and their absences: ["a sled"] -> ["a sled", "no sled"]."""
    positive = list(dict.fromkeys(p for p in phrases if absent_part(p) is None))
    return [*positive, *(f"no {re.sub(r'^(a|an|the) ', '', p)}" for p in positive)]


class _Similarity:
    """Similarity backends score phrases through :meth:`cosines`; :meth:`scores` adds absences: the score of "no X"
    is minus the score of X, so "images that have no sled" are the images whose sled similarity is low, and tau of
    such a phrase lies on that negated scale (sim(X) < -tau). The error score then treats a missing object like any
    other description: the errors of a class on images *without* its usual object can be described (the paper's
    person would write "no sled"; a similarity model cannot read the negation itself)."""

    def cosines(self, rows: Sequence[Row], phrases: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def scores(self, rows: Sequence[Row], phrases: Sequence[str]) -> np.ndarray:
        """(N rows, M phrases) similarities, negated for absences."""
        if not phrases:
            return np.zeros((len(rows), 0), dtype=np.float32)
        parts = [absent_part(p) for p in phrases]
        cores = list(dict.fromkeys(a if a is not None else p for p, a in zip(phrases, parts)))
        cos = self.cosines(rows, cores)
        columns = [(-1 if a is not None else 1) * cos[:, cores.index(a if a is not None else p)]
                   for p, a in zip(phrases, parts)]
        return np.stack(columns, axis=1) if rows else np.zeros((0, len(phrases)), dtype=np.float32)


class CaptionSimilarity(_Similarity):
    """sim(image, phrase) = cosine of the phrase and the image's ``caption`` under an embedder (bag of stems, MiniLM).

    Raises:
        ValueError: (from :meth:`scores`) a row without a caption.
    """

    def __init__(self, embedder: Embedder) -> None:
        self.embedder, self.identity = embedder, f"caption-{embedder.identity}"

    def cosines(self, rows: Sequence[Row], phrases: Sequence[str]) -> np.ndarray:
        """(N rows, M phrases) cosine similarities."""
        missing = [row.get("image_id") for row in rows if not row.get("caption")]
        if missing:
            raise ValueError(f"clarify.similarity={self.identity!r} needs a caption on every row; {len(missing)} lack "
                             f"one (first: {missing[0]!r}). Use similarity 'clip' or caption the dataset first.")
        captions = [row["caption"] for row in rows]
        if isinstance(self.embedder, BowEmbedder):  # one vocabulary for captions and phrases
            vectors = self.embedder.embed([*captions, *phrases])
            return vectors[: len(captions)] @ vectors[len(captions):].T
        parts = [self.embedder.embed(captions[i : i + 256]) for i in range(0, len(captions), 256)]
        return np.concatenate(parts) @ self.embedder.embed(list(phrases)).T


class ClipSimilarity(_Similarity):
    """sim(image, phrase) = CLIP cosine of the image and "a photo of {phrase}" (the generate stage's CLIP code).

    Image features are kept per image path: the error score of every typed or refined phrase, and the slices, score
    the same images again, and only the phrases are new."""

    def __init__(self, model: str, device: str = "auto") -> None:
        from aspire.config import GenerateConfig
        from tasks.generate_sd import ClipFilter

        self.clip = ClipFilter(GenerateConfig(clip_model=model, device=device))
        self.identity = f"clip:{model}"
        self._features: dict[str, torch.Tensor] = {}

    def cosines(self, rows: Sequence[Row], phrases: Sequence[str]) -> np.ndarray:
        """(N rows, M phrases) cosine similarities."""
        if not rows or not phrases:
            return np.zeros((len(rows), len(phrases)), dtype=np.float32)
        new = list(dict.fromkeys(row["path"] for row in rows if row["path"] not in self._features))
        for start in range(0, len(new), 256):
            chunk = new[start : start + 256]
            self._features.update(zip(chunk, self.clip.image_features([load_rgb(p) for p in chunk]).cpu()))
        images = torch.stack([self._features[row["path"]] for row in rows])  # (N, D)
        return (images @ self.clip.text_features(list(phrases)).cpu().T).numpy().astype(np.float32)


def make_similarity(name: str, clip_model: str | None = None, device: str = "auto") -> CaptionSimilarity | ClipSimilarity:
    """The similarity backend called ``name`` (one of :data:`SIMILARITIES`)."""
    if name == "caption-bow":
        return CaptionSimilarity(BowEmbedder())
    if name == "caption-minilm":
        return CaptionSimilarity(MiniLMEmbedder())
    if name == "clip":
        if not clip_model:
            raise ValueError("clarify similarity 'clip' needs a CLIP model (hub id or local folder)")
        return ClipSimilarity(clip_model, device)
    raise ValueError(f"clarify similarity {name!r}: expected one of {SIMILARITIES}")


# -- the error score --------------------------------------------------------------------------------------------


def error_score(sims: np.ndarray, errors: np.ndarray, tau: float | None = None) -> tuple[float, float]:
    """(score, tau) of one phrase on one class's validation images (module docstring).

    With ``tau`` given, the score at that threshold; else the best threshold among the observed similarities. A
    class without errors or without correct images gives (0.0, max similarity).
    """
    sims, errors = np.asarray(sims, dtype=np.float64), np.asarray(errors, dtype=bool)
    n_err, n_ok = int(errors.sum()), int((~errors).sum())
    if n_err == 0 or n_ok == 0:
        return 0.0, float(sims.max()) if len(sims) else 0.0
    candidates = np.array([tau]) if tau is not None else np.unique(sims)
    above_err = (sims[errors][None, :] > candidates[:, None]).sum(1) / n_err  # P(sim > tau | error)
    below_ok = (sims[~errors][None, :] <= candidates[:, None]).sum(1) / n_ok  # P(sim <= tau | correct)
    acc = 0.5 * (above_err + below_ok)
    best = int(acc.argmax())
    return max(0.0, 2 * (float(acc[best]) - 0.5)), float(candidates[best])


# -- annotations ---------------------------------------------------------------------------------------------------


@dataclass
class Annotation:
    """One correction: images of ``class_name`` with sim(image, ``phrase``) > ``tau`` are the ones the model gets wrong."""

    class_name: str
    phrase: str
    tau: float
    error_score: float | None = None


def write_annotations(path: Path, annotations: Sequence[Annotation], note: str = "") -> None:
    """Save annotations as YAML a person can edit (``class``, ``phrase``, ``tau``, ``error_score``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [{"class": a.class_name, "phrase": a.phrase, "tau": round(float(a.tau), 6),
                "error_score": None if a.error_score is None else round(float(a.error_score), 4)} for a in annotations]
    header = ("# CLARIFY annotations: per class, 'the model is often wrong on images that have <phrase>'.\n"
              "# tau: similarity above which an image counts as having it ('no X': minus the similarity to X).\n"
              "# A class may have several phrases (follow-ups). Edit by hand or with `aspire clarify`.\n")
    path.write_text(header + (f"# {note}\n" if note else "") + yaml.safe_dump({"annotations": entries}, sort_keys=False))


def read_annotations(path: Path, class_names: Sequence[str] | None = None) -> list[Annotation]:
    """Annotations from a YAML file written by :func:`write_annotations` (or by hand).

    Raises:
        ValueError: no such file, bad YAML, or an entry with a missing/unknown class, an empty phrase, a tau that is
            not a number, or the same (class, phrase) twice; the message names the file and the entry. A class may
            have several phrases (follow-up annotations, module docstring).
    """
    if not Path(path).is_file():
        raise ValueError(f"{path}: no CLARIFY annotations file; run `aspire clarify CONFIG` or write one by hand")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    entries = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a top-level 'annotations:' list")
    found, seen = [], set()
    for i, entry in enumerate(entries, 1):
        where = f"{path}: annotation {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping with class, phrase, tau")
        name, phrase, tau = entry.get("class"), entry.get("phrase"), entry.get("tau")
        if not name or (class_names is not None and name not in class_names):
            raise ValueError(f"{where}: class {name!r} is not one of {list(class_names or [])}")
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError(f"{where}: phrase must be a non-empty string, got {phrase!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)):
            raise ValueError(f"{where}: tau must be a number, got {tau!r}")
        if (name, phrase.strip()) in seen:
            raise ValueError(f"{where}: class {name!r} has the phrase {phrase.strip()!r} twice")
        seen.add((name, phrase.strip()))
        found.append(Annotation(name, phrase.strip(), float(tau), entry.get("error_score")))
    return found


def score_phrases(rows: Sequence[Row], preds: Sequence[int], class_name: str, phrases: Sequence[str],
                  similarity) -> list[tuple[str, float, float]]:
    """(phrase, error score, tau) of every phrase on the validation rows of ``class_name``."""
    mine = [i for i, row in enumerate(rows) if row["class_name"] == class_name]
    if not mine or not phrases:
        return []
    errors = np.array([preds[i] != rows[i]["label"] for i in mine])
    sims = similarity.scores([rows[i] for i in mine], list(phrases))
    return [(p, *error_score(sims[:, j], errors)) for j, p in enumerate(phrases)]


def uncovered(rows: Sequence[Row], preds: Sequence[int], annotations: Sequence[Annotation], similarity
              ) -> tuple[list[Row], list[int]]:
    """The rows (and their predictions) that no annotation of their class covers: sim <= tau for every one. These
    are the images a follow-up phrase is scored on."""
    keep = np.ones(len(rows), dtype=bool)
    for a in annotations:
        mine = [i for i, row in enumerate(rows) if row["class_name"] == a.class_name]
        if mine:
            sims = similarity.scores([rows[i] for i in mine], [a.phrase])[:, 0]
            keep[[i for i, s in zip(mine, sims) if s > a.tau]] = False
    return [r for r, k in zip(rows, keep) if k], [p for p, k in zip(preds, keep) if k]


def simulated_annotations(val_rows: Sequence[Row], preds: Sequence[int], candidates: Sequence[str], similarity,
                          pick: Literal["best", "random"] = "best", seed: int = 0, phrases_per_class: int = 1
                          ) -> list[Annotation]:
    """The simulated annotator: per class with errors, the best-scoring candidate phrase refined as a person would
    (:func:`refine`; ``pick: best``), or one random candidate (``random``: the control of the same budget); tau by
    the score. The candidates are the given phrases (the extract stage's); absences ("no sled") are left to the
    person (BENCHMARKS.md: offered to this annotator they lowered CLARIFY on the demo). Up to ``phrases_per_class``
    phrases per class: each follow-up is chosen the same way on the class's images that the earlier phrases leave
    uncovered (:func:`uncovered`). A class stops when its best phrase scores 0 (``best``) or nothing uncovered is
    left."""
    rng = np.random.default_rng(seed)
    candidates = list(dict.fromkeys(c for c in candidates if absent_part(c) is None))
    found: list[Annotation] = []
    for name in dict.fromkeys(row["class_name"] for row in val_rows):
        mine = [(r, p) for r, p in zip(val_rows, preds) if r["class_name"] == name]
        rows, class_preds = [r for r, _ in mine], [p for _, p in mine]
        used: set[str] = set()
        for _ in range(phrases_per_class):
            scored = [s for s in score_phrases(rows, class_preds, name, candidates, similarity) if s[0] not in used]
            if not scored:
                break
            if pick == "random":
                choice = scored[int(rng.integers(len(scored)))]
            else:
                choice = refine(max(scored, key=lambda s: s[1]), rows, class_preds, name,
                                [c for c in candidates if c not in used], similarity)
                if choice[1] <= 0:
                    break
            found.append(Annotation(name, choice[0], choice[2], choice[1]))
            used.update(choice[0].split(", "))
            rows, class_preds = uncovered(rows, class_preds, [found[-1]], similarity)
    return found


def refine(start: tuple[str, float, float], val_rows: Sequence[Row], preds: Sequence[int], class_name: str,
           candidates: Sequence[str], similarity, max_terms: int = MAX_TERMS) -> tuple[str, float, float]:
    """What a person at the prompt does: type a phrase, read its score, add another word ("water, lake") while the
    score goes up. Greedy: the candidate whose addition raises the error score most, up to ``max_terms`` terms."""
    best = start
    for _ in range(max_terms - 1):
        used = set(best[0].split(", "))
        longer = [f"{best[0]}, {c}" for c in candidates if c not in used]
        scored = score_phrases(val_rows, preds, class_name, longer, similarity)
        top = max(scored, key=lambda s: s[1], default=None)
        if top is None or top[1] <= best[1]:
            break
        best = top
    return best


# -- slices and weights --------------------------------------------------------------------------------------------


def slice_names(rows: Sequence[Row], annotations: Sequence[Annotation], similarity) -> list[str]:
    """Per row ``<class>|<phrase>`` (sim > tau) or ``<class>|not <phrase>`` for annotated classes, one part per
    annotation of the class in file order (``dog|snow|not a sled``), else ``<class>``; generated rows
    (``source == "generated"``) are their own slice ``<class>|generated`` (ASPIRE App. A.4)."""
    names = [f"{row['class_name']}|generated" if row.get("source") == "generated" else str(row["class_name"])
             for row in rows]
    for a in annotations:
        mine = [i for i, row in enumerate(rows) if row["class_name"] == a.class_name and row.get("source") != "generated"]
        if not mine:
            continue
        sims = similarity.scores([rows[i] for i in mine], [a.phrase])[:, 0]
        for i, s in zip(mine, sims):
            names[i] += f"|{a.phrase}" if s > a.tau else f"|not {a.phrase}"
    return names


def slice_weights(classes: Sequence[str], slices: Sequence[str]) -> np.ndarray:
    """Eq. 2, scaled: per class, its total weight stays its row count; an annotated class's (present) slices share
    it equally; mean weight 1."""
    classes, slices = np.asarray(classes), np.asarray(slices)
    weights = np.ones(len(classes))
    for c in np.unique(classes):
        in_class = classes == c
        names = np.unique(slices[in_class])
        for s in names:
            member = in_class & (slices == s)
            weights[member] = in_class.sum() / (len(names) * member.sum())
    return weights


class Normalize(nn.Module):
    """L2-normalise features (CLARIFY normalises embeddings before training the last layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1)


def _worst(pred: np.ndarray, y: np.ndarray, slices: np.ndarray) -> tuple[float, float]:
    hits = pred == y
    return min(float(hits[slices == s].mean()) for s in np.unique(slices)), float(hits.mean())


# -- the trainer ---------------------------------------------------------------------------------------------------


class CLARIFYTrainer(Trainer):
    """CLARIFY on the trainer interface (module docstring).

    Args:
        annotations: YAML file of (class, phrase, tau), used with ``annotator: file``.
        annotator: ``file`` (a person's annotations), ``simulated`` (best-scoring candidate phrase per class) or
            ``random`` (a random candidate per class: the control).
        candidates: phrases the simulated/random annotator chooses from (the extract stage's phrases).
        phrases_per_class: the simulated/random annotator's phrases per class (1: the paper; more: follow-up
            annotations on the errors the earlier phrases leave, module docstring).
        similarity: one of :data:`SIMILARITIES`; ``clip_model`` for ``clip``.
        mode: ``last-layer`` (the paper's: logistic regression on the frozen, L2-normalised reference features) or
            ``full`` (fine-tune the whole model with the weights).
        variant: ``slice-balanced`` (Eq. 2) or ``worst-slice`` (Group DRO over the slices, whole model).
        reference_model / reference_model_path: the model whose errors were annotated (default: ERM on the train rows).
        c_grid: inverse L2 strengths of the last layer, chosen on the validation slices.
    """

    def __init__(self, annotations: str | None = None, annotator: Literal["file", "simulated", "random"] = "file",
                 candidates: Sequence[str] = (), similarity: str = "caption-bow", clip_model: str | None = None,
                 mode: Literal["last-layer", "full"] = "last-layer",
                 variant: Literal["slice-balanced", "worst-slice"] = "slice-balanced",
                 reference_model: nn.Module | None = None, reference_model_path: str | None = None,
                 c_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0), phrases_per_class: int = 1) -> None:
        if annotator == "file" and not annotations:
            raise ValueError("clarify: annotator 'file' needs an annotations file (run `aspire clarify CONFIG`)")
        if annotator in ("simulated", "random") and not candidates:
            raise ValueError(f"clarify: annotator {annotator!r} needs candidate phrases (the run's extract stage)")
        if mode not in ("last-layer", "full") or variant not in ("slice-balanced", "worst-slice"):
            raise ValueError(f"clarify: mode={mode!r}, variant={variant!r}: expected last-layer|full, "
                             "slice-balanced|worst-slice")
        if phrases_per_class < 1:
            raise ValueError(f"clarify: phrases_per_class={phrases_per_class}: need at least 1")
        if reference_model is None and reference_model_path is not None:
            reference_model = load_model(Path(reference_model_path))[0]
        self.annotations, self.annotator, self.candidates = annotations, annotator, list(candidates)
        self.similarity_name, self.clip_model, self.mode, self.variant = similarity, clip_model, mode, variant
        self.reference, self.c_grid, self.phrases_per_class = reference_model, tuple(c_grid), phrases_per_class

    def train(self, train_rows: Sequence[Row], val_rows: Sequence[Row], config: ClassifierConfig, seed: int) -> TrainResult:
        """Annotate (or read annotations), weigh the slices and train; ``extras`` holds the annotations, the
        annotation budget (phrases), slice sizes and the selection rule.

        Raises:
            ValueError: no val rows (the errors to describe are validation errors), bad annotations.
        """
        check_rows(train_rows, "train_rows")
        check_rows(val_rows, "val_rows")
        reference = self.reference or ERMTrainer().train(train_rows, val_rows, config, seed).model
        similarity = make_similarity(self.similarity_name, self.clip_model, config.device)
        classes = list(dict.fromkeys(row["class_name"] for row in [*train_rows, *val_rows]))
        if self.annotator == "file":
            annotations = read_annotations(Path(self.annotations), classes)
        else:
            preds = predict_rows(reference, val_rows, config)
            annotations = simulated_annotations(val_rows, preds, self.candidates, similarity,
                                                "best" if self.annotator == "simulated" else "random", seed,
                                                self.phrases_per_class)
        log.info("CLARIFY: %s", [(a.class_name, a.phrase, round(a.tau, 3)) for a in annotations])
        train_slices = np.array(slice_names(train_rows, annotations, similarity))
        val_slices = np.array(slice_names(val_rows, annotations, similarity))
        weights = slice_weights([r["class_name"] for r in train_rows], train_slices)
        k = num_classes(train_rows, val_rows)
        extras = {"annotations": [asdict(a) for a in annotations], "budget": {"phrases": len(annotations)},
                  "annotator": self.annotator, "similarity": similarity.identity, "mode": self.mode,
                  "variant": self.variant, "selection": SELECTION,
                  "train_slices": {s: int((train_slices == s).sum()) for s in np.unique(train_slices)}}
        val_as_slices = [{**row, "group": s, "group_name": None} for row, s in zip(val_rows, val_slices)]
        if self.variant == "worst-slice":
            train_as_slices = [{**row, "group": s} for row, s in zip(train_rows, train_slices)]
            result = GroupDROTrainer().train(train_as_slices, val_as_slices, config, seed)
            return TrainResult(result.model, result.history, result.best_epoch, {**extras, **result.extras})
        if self.mode == "full":
            config = config.model_copy(update={"seed": seed})
            model = build_model(config, k)
            history, best = fit(model, train_rows, val_as_slices, config, seed, sample_weights=weights.tolist())
            return TrainResult(model, history, best, extras)
        return self._last_layer(reference, train_rows, val_rows, train_slices, val_slices, weights, config, k, seed, extras)

    def _last_layer(self, reference, train_rows, val_rows, train_slices, val_slices, weights, config, k, seed, extras):
        backbone = strip_head(reference)
        unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
        x_train, x_val = unit(embed(backbone, train_rows, config)), unit(embed(backbone, val_rows, config))
        y_train = np.array([r["label"] for r in train_rows])
        y_val = np.array([r["label"] for r in val_rows])
        table, best = [], None
        for c in self.c_grid:
            clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_train, y_train, sample_weight=weights)
            worst, avg = _worst(clf.predict(x_val), y_val, val_slices)
            table.append({"C": c, "val_worst_slice_acc": worst, "val_avg_acc": avg})
            if best is None or (worst, avg) > (best[1]["val_worst_slice_acc"], best[1]["val_avg_acc"]):
                best = (clf, table[-1])
        head = linear_head(*per_class_logits(best[0].coef_, best[0].intercept_, k))
        model = nn.Sequential(backbone, Normalize(), head).eval()
        return TrainResult(model, [], None, {**extras, "c_table": table, "best_c": best[1]["C"]})
