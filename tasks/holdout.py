"""Stage 1, ``holdout``: train the ERM classifier, predict every image, keep p% of the correct train images.

ASPIRE Sec. 2(1) (https://arxiv.org/abs/2308.10103): "we first identify training examples that are
correctly classified by a standard ERM model and then randomly select p% of them". The predictions on
val/test give the report's ``before`` block.

Columns added: ``pred`` (int), ``pred_conf`` (float), ``correct`` (bool), ``holdout`` (bool).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from aspire.cache import ShardResult, StageStore
from aspire.classifier import build_model, load_model, predict_images, save_model, train_erm
from aspire.config import ClassifierConfig, HoldoutConfig
from aspire.images import ImageError, load_rgb
from aspire.manifest import Row, class_names
from aspire.metrics import group_accuracy

log = logging.getLogger(__name__)

STAGE = "holdout"
VERSION = 1
MODEL_PART = "model"
MODEL_FILE = "model.pt"


def train_classifier(rows: list[Row], config: ClassifierConfig, out_dir: Path, checkpoint: Path) -> dict:
    """Train ERM on the ``train`` rows and save ``model.pt`` and ``history.json`` into ``out_dir``.

    Raises:
        ValueError: there are no training rows, or fewer than two classes.
    """
    train = [r for r in rows if r["split"] == "train"]
    if not train:
        raise ValueError("holdout: the manifest has no rows with split='train' to train the classifier on")
    names = class_names(rows)
    model = build_model(config, len(names))
    history = train_erm(model, train, config, checkpoint=checkpoint)
    save_model(model, out_dir / MODEL_FILE, config, names)
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    return {"epochs": len(history), "final_train_acc": history[-1]["train_acc"], "classes": names}


_models: dict[str, object] = {}
_models_lock = threading.Lock()


def load_classifier(path: Path):
    """Load a saved classifier once per worker process (later calls return the same object)."""
    with _models_lock:
        if str(path) not in _models:
            _models[str(path)] = load_model(path)
        return _models[str(path)]


def run_predict(rows: list[Row], model_path: Path) -> ShardResult:
    """Predict every row's image; rows whose image no longer loads are quarantined with the reason."""
    model, config, _ = load_classifier(model_path)
    kept, images, quarantine = [], [], []
    for row in rows:
        try:
            images.append(load_rgb(row["path"]))
            kept.append(row)
        except ImageError as exc:
            quarantine.append({"image_id": row["image_id"], "path": row["path"], "reason": exc.reason})
    preds, confs = predict_images(model, images, config.image_size, config.batch_size, config.device)
    out = [
        {**row, "pred": p, "pred_conf": round(c, 6), "correct": p == row["label"]}
        for row, p, c in zip(kept, preds, confs)
    ]
    return ShardResult(out, quarantine)


def select_holdout(rows: list[Row], config: HoldoutConfig) -> list[Row]:
    """Mark ``holdout=True`` on round(p * n) of the n correctly classified train rows, sampled with the seed.

    The sample depends only on the seed and the set of candidate image ids, not on row order or sharding.
    """
    candidates = sorted(r["image_id"] for r in rows if r["split"] == "train" and r["correct"])
    n_keep = min(len(candidates), max(1, round(config.fraction * len(candidates)))) if candidates else 0
    rng = np.random.default_rng(config.seed)
    chosen = set(rng.permutation(len(candidates))[:n_keep].tolist())
    keep = {candidates[i] for i in chosen}
    return [{**r, "holdout": r["image_id"] in keep} for r in rows]


def evaluate(rows: list[Row]) -> dict:
    """The report's ``before`` block: accuracy on the test split (val too, when present)."""
    result = {}
    for split in ("val", "test"):
        split_rows = [r for r in rows if r["split"] == split]
        if split_rows:
            result[split] = group_accuracy(split_rows)
    return result


@task(name="train-classifier", tags=["gpu"], cache_policy=NO_CACHE)
def train_task(store: StageStore, rows: list[Row], config: ClassifierConfig) -> dict:
    """Train and commit the model part (skipped when committed; resumes from the last epoch after a kill)."""
    marker = store.read_marker(MODEL_PART)
    if marker is not None:
        return {**marker, "cached": True}
    store.root.mkdir(parents=True, exist_ok=True)
    checkpoint = store.root / "train-checkpoint.pt"
    marker = store.commit(MODEL_PART, lambda tmp: train_classifier(rows, config, tmp, checkpoint),
                          checked_files=(MODEL_FILE,))
    checkpoint.unlink(missing_ok=True)
    return {**marker, "cached": False}


@task(name="predict-shard", tags=["gpu"], cache_policy=NO_CACHE, retries=1)
def predict_shard_task(store: StageStore, index: int, rows: list[Row]) -> dict:
    """Predict one shard with the committed model and commit it (skipped when already committed)."""
    model_path = store.part_dir(MODEL_PART) / MODEL_FILE
    return store.ensure_shard(index, rows, lambda shard_rows, _: run_predict(shard_rows, model_path))
