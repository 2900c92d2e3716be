"""Stage ``classifier`` (first half of ASPIRE step 1): train the ERM classifier and predict every image.

ASPIRE Sec. 2(1) and 3 (https://arxiv.org/abs/2308.10103): a standard ERM model (SGD, lr 1e-3, weight decay
1e-4). Its predictions feed the ``holdout`` stage (which train images it gets right) and the report's
``before`` block (val/test accuracy). The model is one committed part; each prediction shard records the
model's digest, so a retrained model never mixes with old predictions.

Columns added: ``pred`` (int), ``pred_conf`` (float), ``correct`` (bool).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from aspire.cache import ShardResult, StageStore, file_digest
from aspire.config import ClassifierConfig
from aspire.images import ImageError, load_rgb
from aspire.lazy import library_version
from aspire.manifest import Row, class_names
from aspire.synth import SynthConfig
from tasks import retry_if_transient

log = logging.getLogger(__name__)

STAGE = "classifier"
VERSION = 1
MODEL_PART = "model"
MODEL_FILE = "model.pt"


def classifier_identity(config: ClassifierConfig) -> str:
    """What the trained model depends on besides the config: library versions and the starting weights."""
    weights = config.weights
    if weights not in (None, "imagenet") and Path(weights).is_file():
        weights = f"{Path(weights).name}@{file_digest(Path(weights))}"
    return f"torch {library_version('torch')}, torchvision {library_version('torchvision')}, weights {weights}"


def model_file(store: StageStore, part: str = MODEL_PART) -> Path:
    """Where the stage's trained model is committed (``part``: one of several models, e.g. the retrain stage's
    ``model-x2``)."""
    return store.part_dir(part) / MODEL_FILE


def key_config(config: ClassifierConfig) -> dict:
    """The fields that change the trained model (device and loader workers do not, nor the crop bounds when
    nothing is cropped: models trained before ``augment`` existed keep their key)."""
    unused = {"augment", "crop_scale", "crop_ratio"} if config.augment == "none" else set()
    return config.model_dump(mode="json", exclude={"device", "num_workers", *unused})


def train_classifier(rows: list[Row], config: ClassifierConfig, out_dir: Path, checkpoint: Path) -> dict:
    """Train ERM on the ``train`` rows and save ``model.pt`` and ``history.json`` into ``out_dir``.

    Raises:
        ValueError: there are no training rows, or fewer than two classes.
    """
    from aspire.classifier import build_model, fit, save_model

    train = [r for r in rows if r["split"] == "train"]
    if not train:
        raise ValueError("classifier: the manifest has no rows with split='train' to train on")
    names = class_names(rows)
    model = build_model(config, len(names))
    history, _ = fit(model, train, [], config, config.seed, checkpoint=checkpoint)
    save_model(model, out_dir / MODEL_FILE, config, names)
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    return {"epochs": len(history), "final_train_acc": history[-1]["train_acc"], "classes": names}


_models: dict[tuple[str, str], tuple] = {}
_models_lock = threading.Lock()


def load_classifier(path: Path, model_digest: str):
    """Load a saved classifier once per worker process; a retrained model (new digest) replaces the old."""
    from aspire.classifier import load_model

    with _models_lock:
        key = (str(path), model_digest)
        if key not in _models:
            for old in [k for k in _models if k[0] == str(path)]:
                del _models[old]
            _models[key] = load_model(path)
        return _models[key]


def run_predict(rows: list[Row], model_path: Path, model_digest: str) -> ShardResult:
    """Predict every row's image; rows whose image no longer loads are quarantined with the reason."""
    from aspire.classifier import predict_images

    model, config, _ = load_classifier(model_path, model_digest)
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
    return ShardResult(out, quarantine, {"predicted": len(out)})


def probe_cues(synth: SynthConfig, models: dict[str, Path], per_cell: int = 8
               ) -> tuple[dict[str, dict], dict[str, list[Row]]]:
    """Which cue each saved classifier follows on the synthetic benchmark's cue probe
    (:func:`aspire.synth.draw_cue_probe`, :func:`aspire.synth.cue_reliance`): ``{name: {shape, background,
    object, images}}``, and per model the probe's images as rows (split ``cue-probe``: ``label``, ``class_name``,
    ``scene``, ``objects``, ``pred``), which :func:`aspire.metrics.lost_images` takes as more images of a context.
    The probe's images are drawn from the benchmark's seed, the same for every model."""
    from aspire.classifier import load_model, predict_images
    from aspire.synth import cue_reliance, draw_cue_probe

    images, cells = draw_cue_probe(synth, per_cell, seed=synth.seed)
    cues, rows = {}, {}
    for name, path in models.items():
        model, config, names = load_model(path)
        predicted, _ = predict_images(model, images, config.image_size, config.batch_size, config.device)
        cues[name] = cue_reliance(synth, cells, [names[i] for i in predicted])
        rows[name] = [{"image_id": f"cue-probe-{i}", "split": "cue-probe", "label": names.index(synth.classes[label].name),
                       "class_name": synth.classes[label].name, "scene": background, "objects": [obj] if obj else [],
                       "pred": pred} for i, ((label, background, obj), pred) in enumerate(zip(cells, predicted))]
    return cues, rows


@task(name="train-classifier", tags=["gpu"], cache_policy=NO_CACHE)
def train_task(store: StageStore, rows: list[Row], config: ClassifierConfig, part: str = MODEL_PART) -> dict:
    """Train and commit the model part (skipped when committed; resumes from the last epoch after a kill)."""
    checkpoint = store.root / ("train-checkpoint.pt" if part == MODEL_PART else f"train-checkpoint-{part}.pt")
    marker = store.ensure_part(part, lambda tmp: train_classifier(rows, config, tmp, checkpoint),
                               checked_files=(MODEL_FILE,))
    checkpoint.unlink(missing_ok=True)
    return marker


@task(name="predict-shard", task_run_name="predict-shard-{index}", tags=["gpu"], cache_policy=NO_CACHE, retries=1,
      retry_condition_fn=retry_if_transient)
def predict_shard_task(store: StageStore, index: int, rows: list[Row], model_digest: str, part: str = MODEL_PART) -> dict:
    """Predict one shard with the committed model and commit it (skipped when already committed)."""
    model_path = model_file(store, part)
    return store.ensure_shard(index, rows, lambda shard_rows, _: run_predict(shard_rows, model_path, model_digest),
                              salt=model_digest)
