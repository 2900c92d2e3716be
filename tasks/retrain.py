"""Stage ``retrain`` (ASPIRE step 6): retrain the classifier on the augmented set, evaluate on val/test.

ASPIRE Sec. 2(6) (https://arxiv.org/abs/2308.10103). The classifier settings are the ``classifier``
section's (``retrain.epochs`` may override the epochs); training and prediction reuse the classifier
stage's tasks, so the model is a committed part and predictions are shards salted with its digest.
``retrain.method`` jtt / dfr / groupdro trains with :mod:`aspire.robust` instead; generated rows get a group
of their own per class (as in ``aspire train``).
"""

from __future__ import annotations

import json

from prefect import task
from prefect.cache_policies import NO_CACHE

from aspire.cache import StageStore
from aspire.config import ClassifierConfig, RetrainConfig
from aspire.manifest import Row, read_jsonl, write_jsonl

STAGE = "retrain"
VERSION = 1
ROBUST_PART = "robust"
PREDICTIONS = "predictions.jsonl"


def retrain_config(classifier: ClassifierConfig, retrain: RetrainConfig) -> ClassifierConfig:
    """The classifier config used to retrain."""
    return classifier.model_copy(update={"epochs": retrain.epochs or classifier.epochs})


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
def robust_task(store: StageStore, rows: list[Row], config: ClassifierConfig, method: str, trainer_args: dict) -> list[Row]:
    """Train with a robust method and commit its val/test predictions (skipped when committed)."""
    def write(tmp):
        predicted = run_robust(rows, config, method, trainer_args)
        write_jsonl(predicted, tmp / PREDICTIONS)
        return {"method": method, "predicted": len(predicted)}

    store.ensure_part(ROBUST_PART, write, json.dumps([method, trainer_args], sort_keys=True), (PREDICTIONS,))
    return read_jsonl(store.part_dir(ROBUST_PART) / PREDICTIONS)
