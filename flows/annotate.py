"""The person in the loop: ``aspire clarify`` (describe the reference model's errors in words) and ``aspire slim``
(say yes/no to its attention on a few images). Both read what ``aspire run`` committed, the classifier stage's ERM
model being the reference model, and write an annotations file that ``aspire train --method clarify|slim`` reads.
No Prefect server is started: nothing here is a flow."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from aspire.classifier import load_model, predict_rows
from aspire.config import RunConfig
from aspire.images import load_rgb
from aspire.manifest import Row
from aspire.robust.clarify import (
    Annotation,
    error_score,
    make_similarity,
    read_annotations,
    score_phrases,
    simulated_annotations,
    uncovered,
    with_absences,
    write_annotations,
)
from flows.train import committed

THUMB = 64
PER_SIDE = 24


def write_montage(path: Path, correct: list[Row], wrong: list[Row], title: str) -> Path:
    """One PNG: up to 24 correctly classified validation images on the left, up to 24 wrong ones on the right."""
    cols = 6
    rows_n = max(1, -(-min(PER_SIDE, max(len(correct), len(wrong), 1)) // cols))
    width, height = 2 * cols * THUMB + 3 * 8, rows_n * THUMB + 40
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 4), title, fill="black")
    for side, (label, images) in enumerate((("correct", correct), ("wrong", wrong))):
        x0 = 8 + side * (cols * THUMB + 8)
        draw.text((x0, 20), f"{label} ({len(images)})", fill="darkgreen" if side == 0 else "darkred")
        for i, row in enumerate(images[:PER_SIDE]):
            thumb = load_rgb(row["path"]).resize((THUMB, THUMB))
            sheet.paste(thumb, (x0 + (i % cols) * THUMB, 36 + (i // cols) * THUMB))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _reference(config: RunConfig):
    found = committed(config)
    if found.erm_model is None or not Path(found.erm_model).is_file():
        raise ValueError(f"{config.workdir}: the classifier stage is not committed; run `aspire run` first")
    model, _, _ = load_model(Path(found.erm_model))
    val = [r for r in found.datasets["original"] if r["split"] == "val" and r.get("source") != "generated"]
    if not val:
        raise ValueError(f"{config.workdir}: the dataset has no validation rows; CLARIFY describes validation errors")
    return found, model, val


def clarify_session(config: RunConfig, annotator: str = "person", ask: Callable[[str], str] = input,
                    say: Callable[[str], None] = print) -> Path:
    """Per class: a montage of correct / wrong validation images, the error score of every phrase the person types,
    and the kept (class, phrase, tau) saved to the annotations YAML. ``annotator``: person, simulated or random.

    Input per class: a phrase (its score and tau are printed; type more to compare), ``phrase @ 0.3`` to set tau
    yourself, an empty line to keep the best phrase so far and go to the next class, ``skip`` to leave the class.
    With ``retrain.clarify_phrases`` above 1 the person is then asked for a follow-up phrase, scored on the class's
    images the kept phrases do not cover, up to that many per class.
    """
    found, model, val = _reference(config)
    retrain = config.retrain
    preds = predict_rows(model, val, config.classifier)
    similarity = make_similarity(retrain.clarify_similarity, retrain.clarify_clip_model, config.classifier.device)
    out = retrain.annotation_path("clarify", config.workdir)
    classes = list(dict.fromkeys(r["class_name"] for r in val))
    say(f"{'class':<16} {'val images':>10} {'wrong':>6} {'error rate':>10}  montage")
    stats = []
    for name in classes:
        mine = [(r, p) for r, p in zip(val, preds) if r["class_name"] == name]
        wrong = [r for r, p in mine if p != r["label"]]
        montage = write_montage(out.parent / f"montage-{name}.png", [r for r, p in mine if p == r["label"]], wrong,
                                f"class {name}: correct (left) vs wrong (right) predictions of the reference model")
        stats.append((name, len(mine), len(wrong)))
        say(f"{name:<16} {len(mine):>10} {len(wrong):>6} {len(wrong) / max(1, len(mine)):>10.1%}  {montage}")
    if annotator in ("simulated", "random"):
        annotations = simulated_annotations(val, preds, found.phrases, similarity,
                                            "best" if annotator == "simulated" else "random",
                                            phrases_per_class=retrain.clarify_phrases)
    else:
        annotations = []
        for name, n, n_wrong in sorted(stats, key=lambda s: -s[2] / max(1, s[1])):
            if n_wrong == 0:
                say(f"{name}: no validation errors, nothing to describe")
                continue
            annotations += _ask_class(name, val, preds, similarity, found.phrases, ask, say, retrain.clarify_phrases,
                                      out.parent)
    if not annotations:
        raise ValueError(f"no annotation kept (every class skipped or no input); {out} left as it was")
    write_annotations(out, annotations, note=f"reference model: {found.erm_model}; similarity: {similarity.identity}; "
                                             f"annotator: {annotator}")
    for a in read_annotations(out, classes):
        say(f"kept: {a.class_name}: '{a.phrase}' (tau {a.tau:.3f}, error score {a.error_score})")
    say(f"annotations: {out} (edit by hand or rerun; `aspire train CONFIG --method clarify` reads them)")
    return out


def _ask_class(name, val, preds, similarity, hints, ask, say, phrases: int, montages: Path) -> list[Annotation]:
    """Up to ``phrases`` annotations of class ``name``: the first on all its validation images, each follow-up on
    the images the kept ones do not cover (with a montage of those)."""
    kept: list[Annotation] = []
    rows = [r for r in val if r["class_name"] == name]
    class_preds = [p for r, p in zip(val, preds) if r["class_name"] == name]
    while len(kept) < phrases:
        rows, class_preds = uncovered(rows, class_preds, kept[-1:], similarity)
        errors = np.array([p != r["label"] for r, p in zip(rows, class_preds)])
        if not errors.any():
            say(f"{name}: no errors left that the kept phrases do not cover")
            break
        if kept:
            montage = write_montage(montages / f"montage-{name}-{len(kept) + 1}.png",
                                    [r for r, e in zip(rows, errors) if not e], [r for r, e in zip(rows, errors) if e],
                                    f"class {name}, not covered by the kept phrases: correct (left) vs wrong (right)")
            say(f"{name}: {int(errors.sum())} of {len(rows)} images the kept phrases do not cover are wrong: {montage}")
        found = _ask_phrase(name, rows, class_preds, errors, similarity, hints, ask, say, follow_up=bool(kept))
        if found is None:
            break
        kept.append(found)
    return kept


def _ask_phrase(name, rows, preds, errors, similarity, hints, ask, say, follow_up: bool) -> Annotation | None:
    scored = sorted(score_phrases(rows, preds, name, with_absences(hints), similarity), key=lambda s: -s[1])[:3]
    if scored:
        say(f"{name}: phrases from the run's captions, best first: " + ", ".join(f"'{p}' {s:.2f}" for p, s, _ in scored))
    prompt = "The model is also often wrong on images that have" if follow_up else "The model is often wrong on images that have"
    prompt += " ___ ('no X' for an absence;"
    best: Annotation | None = None
    while True:
        text = ask(f"{name}: {prompt} empty: keep best, 'skip'): ").strip()
        if not text:
            return best
        if text == "skip":
            return None
        phrase, _, tau_text = (part.strip() for part in text.partition("@"))
        try:
            tau = float(tau_text) if tau_text else None
        except ValueError:
            say(f"  '{tau_text}' is not a number; write 'phrase @ 0.3'")
            continue
        sims = similarity.scores(rows, [phrase])[:, 0]
        score, tau = error_score(sims, errors, tau)
        say(f"  '{phrase}': error score {score:.2f} at tau {tau:.3f} "
            f"({int((sims > tau).sum())} of {len(rows)} images above tau)")
        if best is None or score > best.error_score:
            best = Annotation(name, phrase, tau, score)


def slim_session(config: RunConfig, annotator: str = "person", say: Callable[[str], None] = print) -> Path:
    """SLIM's queries: GradCAM of the reference model on the pool (train rows for ``retrain.slim_mode: train``, val
    rows for ``val``), ``retrain.slim_queries`` images chosen by k-means in the attention space, written as
    (image | heat map) grids with ``annotations.csv`` to fill in. ``annotator: simulated`` fills the answers from
    the object boxes (for the demo and benchmarks); the person answers otherwise."""
    from aspire.robust.slim import attention_queries, simulate_queries, write_queries

    found, model, val = _reference(config)
    retrain = config.retrain
    pool = val if retrain.slim_mode == "val" else [r for r in found.datasets["original"] if r["split"] == "train"]
    out = retrain.annotation_path("slim", config.workdir)
    say(f"SLIM_{retrain.slim_mode}: GradCAM of the reference model on {len(pool)} rows ...")
    att = attention_queries(model, pool, config.classifier, retrain.slim_queries, retrain.seed or 0)
    queries = att.queries
    written = write_queries(out.parent, pool, queries, att.cams, config.classifier)
    if written != out:  # a custom retrain.slim_annotations path: the person fills that one
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(written.read_text())
    if annotator == "simulated":
        said = simulate_queries(pool, queries, att.cams, retrain.slim_flip_rate, retrain.seed or 0)
        lines = ["image_id,class,answer"] + [f"{pool[i]['image_id']},{pool[i]['class_name']},{'yes' if s else 'no'}"
                                             for i, s in zip(queries, said)]
        out.write_text("\n".join(lines) + "\n")
    grids = sorted(out.parent.glob("queries-*.png"))
    say(f"{len(queries)} queries in {len(grids)} grid(s): {', '.join(str(g) for g in grids)}")
    say(f"answers: {out} ({'filled by the simulated annotator' if annotator == 'simulated' else 'write yes / no / unsure per row'}; "
        f"see {out.parent / 'README.txt'}); then `aspire train CONFIG --method slim`")
    return out
