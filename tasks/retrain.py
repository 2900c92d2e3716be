"""Stage ``retrain`` (ASPIRE step 6): retrain the classifier on the augmented set, evaluate on val/test.

ASPIRE Sec. 2(6) (https://arxiv.org/abs/2308.10103). The classifier settings are the ``classifier``
section's (``retrain.epochs`` may override the epochs); training and prediction reuse the classifier
stage's tasks, so the model is a committed part and predictions are shards salted with its digest.
``retrain.method`` jtt / dfr / groupdro trains with :mod:`aspire.robust` instead; generated rows get a group
of their own per class (as in ``aspire train``). Datasets without group labels get groups from the run's top-k
spurious phrases (:func:`assign_groups`, ``retrain.groups``).
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from aspire.cache import StageStore
from aspire.config import CaptionConfig, ClassifierConfig, RetrainConfig
from aspire.groups import phrase_groups
from aspire.manifest import Row, digest, read_jsonl, write_jsonl
from tasks import quote

STAGE = "retrain"
VERSION = 2
KEPT_MODEL_BEFORE = ("nothing was generated, so the augmented set is the original one: the ERM model before stands "
                     "(retraining it with another seed would only measure the seed)")
"""Why an ERM retrain stage trained nothing (its summary's ``kept_model_before``, shown by the report)."""
ROBUST_PART = "robust"
PREDICTIONS = "predictions.jsonl"
CAPTIONS = "captions.jsonl"


def multiple_part(part: str, multiple: float | None) -> str:
    """The committed part of the model trained with one of several ``generate.per_class`` multiples
    (``model-x2``); ``part`` itself when there was one multiple (None)."""
    return part if multiple is None else f"{part}-x{multiple:g}"


def has_group_labels(rows: list[Row]) -> bool:
    """Whether every row of the dataset (generated rows aside) has a ``group``."""
    return all(r.get("group") is not None for r in rows if r.get("source") != "generated")


def group_mode(rows: list[Row], mode: str) -> str:
    """``labels`` or ``phrases``: ``auto`` resolved by :func:`has_group_labels`.

    Raises:
        ValueError: ``labels`` asked for rows without group labels.
    """
    if mode == "auto":
        return "labels" if has_group_labels(rows) else "phrases"
    if mode == "labels" and not has_group_labels(rows):
        missing = sum(r.get("group") is None for r in rows if r.get("source") != "generated")
        raise ValueError(f"retrain.groups=labels: {missing} dataset rows have no 'group'; use retrain.groups=phrases "
                         "(groups from the run's spurious phrases) or auto")
    return mode


def assign_groups(rows: list[Row], mode: str, spurious: dict[str, list[list[str]]],
                  captions: dict[str, str | None]) -> tuple[list[Row], dict]:
    """Rows grouped for group-aware training, and a summary (``groups``: the mode used, ``group_sizes``).

    ``labels`` keeps the dataset's groups. ``phrases`` replaces the train and val rows' groups by
    :func:`aspire.groups.phrase_groups`; test rows keep labelled groups when they all have one (evaluation on
    the dataset's own groups), else get phrase groups too. Generated rows are left to
    :func:`tasks.export.with_generated_groups`.
    """
    mode = group_mode(rows, mode)
    if mode == "labels":
        return rows, {"groups": "labels"}
    test_labelled = all(r.get("group") is not None for r in rows if r["split"] == "test" and r.get("source") != "generated")
    todo = [r for r in rows if r.get("source") != "generated" and not (r["split"] == "test" and test_labelled)]
    grouped, sizes = phrase_groups(todo, spurious, captions)
    by_id = {r["image_id"]: r for r in grouped}
    out = [by_id.get(r["image_id"], r) if r.get("source") != "generated" else r for r in rows]
    return out, {"groups": "phrases", "test_groups": "labels" if test_labelled else "phrases", "group_sizes": sizes}


def group_rows(store: StageStore, rows: list[Row], retrain: RetrainConfig, caption: CaptionConfig,
               spurious: dict[str, list[list[str]]] | None, stage_captions: list[Row]) -> tuple[list[Row], dict]:
    """:func:`assign_groups` with captions gathered for ``phrases``: the caption stage's (``stage_captions``), else
    the row's own ``caption`` column, else made by the configured captioner (:func:`caption_missing_task`; with
    the ``metadata`` backend such rows go to the ``uncaptioned`` group).

    Raises:
        ValueError: phrase groups are needed but ``spurious`` is ``None`` (the collapse stage is not committed).
    """
    mode = group_mode(rows, retrain.groups)
    if mode == "labels":
        return rows, {"groups": "labels"}
    if spurious is None:
        raise ValueError("retrain.groups: the dataset has no group labels and the collapse stage (top-k spurious "
                         "phrases) is not committed; run `aspire run` through the collapse stage first")
    captions = {r["image_id"]: r["caption"] for r in rows if isinstance(r.get("caption"), str) and r["caption"].strip()}
    captions.update({r["image_id"]: r["caption"] for r in stage_captions if r.get("caption")})
    missing = [r for r in rows if r.get("source") != "generated" and r["image_id"] not in captions]
    made = caption_missing_task(store, quote(missing), caption) if missing and caption.backend != "metadata" else {}
    grouped, info = assign_groups(rows, mode, spurious, {**captions, **made})
    return grouped, {**info, "captioned_here": sum(c is not None for c in made.values())}


@task(name="caption-for-groups", tags=["gpu"], cache_policy=NO_CACHE)
def caption_missing_task(store: StageStore, rows: list[Row], config: CaptionConfig) -> dict[str, str | None]:
    """Caption ``rows`` with the configured captioner, for phrase groups; committed as a part keyed by the rows
    and captioner (a rerun reads it back). Rows the captioner skips map to ``None`` (group ``uncaptioned``)."""
    from tqdm.auto import tqdm

    from tasks.caption import Skipped, captioner_identity, load_captioner

    def write(tmp):
        captioner = load_captioner(config)
        out = []
        for start in tqdm(range(0, len(rows), config.batch_size), desc="captions for groups", unit="batch", disable=None):
            chunk = rows[start : start + config.batch_size]
            out += [{"image_id": r["image_id"], "caption": None if isinstance(c, Skipped) else c}
                    for r, c in zip(chunk, captioner.caption_rows(chunk))]
        write_jsonl(out, tmp / CAPTIONS)
        return {"captioned": sum(r["caption"] is not None for r in out), "skipped": sum(r["caption"] is None for r in out)}

    wanted = digest([captioner_identity(config), [[r["image_id"], r.get("path")] for r in rows]])
    store.ensure_part("captions", write, wanted, checked_files=(CAPTIONS,))
    return {r["image_id"]: r["caption"] for r in read_jsonl(store.part_dir("captions") / CAPTIONS)}


def retrain_config(classifier: ClassifierConfig, retrain: RetrainConfig) -> ClassifierConfig:
    """The classifier config used to retrain."""
    seed = classifier.seed if retrain.seed is None else retrain.seed
    return classifier.model_copy(update={"epochs": retrain.epochs or classifier.epochs, "seed": seed})


def run_robust(rows: list[Row], config: ClassifierConfig, method: str, trainer_args: dict) -> list[Row]:
    """Train ``method`` on the train rows (selected on val) and predict the val and test rows."""
    from aspire.robust import make_trainer
    from aspire.robust.base import predict_rows
    from tasks.export import with_generated_groups

    rows = with_generated_groups(rows)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    result = make_trainer(method, **trainer_args).train(train, val, config, config.seed)
    evaluated = [r for r in rows if r["split"] in ("val", "test") and r.get("source") != "generated"]
    preds = predict_rows(result.model, evaluated, config)
    return [{**r, "pred": p, "correct": p == r["label"]} for r, p in zip(evaluated, preds)]


@task(name="retrain-robust", tags=["gpu"], cache_policy=NO_CACHE)
def robust_task(store: StageStore, rows: list[Row], config: ClassifierConfig, method: str, trainer_args: dict,
                part: str = ROBUST_PART) -> list[Row]:
    """Train with a robust method and commit its val/test predictions as ``part`` (skipped when committed)."""
    def write(tmp):
        predicted = run_robust(rows, config, method, trainer_args)
        write_jsonl(predicted, tmp / PREDICTIONS)
        return {"method": method, "predicted": len(predicted)}

    store.ensure_part(part, write, digest([method, trainer_args, digest(rows)]), (PREDICTIONS,))
    return read_jsonl(store.part_dir(part) / PREDICTIONS)
