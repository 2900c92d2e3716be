"""Stage ``remove`` (ASPIRE step 4a): remove each foreground object and see whether the prediction flips.

ASPIRE Sec. 2(4.a) and Appendix D (https://arxiv.org/abs/2308.10103); mask dilation as in Hard-Spurious-ImageNet
App. C. For every held-out image and every foreground phrase: ground the phrase to boxes (one grounding
forward per image for all its phrases), segment inside the boxes (one image embedding per image for all its
boxes), dilate, inpaint (batched) and re-classify with the ERM model (batched). An edit whose prediction is no
longer the true label is kept: it is evidence that the phrase is a spurious feature of the class.

Output: the input rows unchanged, plus one row per attempt (``source="edit-remove"``) with ``phrase``,
``boxes``, ``scores``, ``mask_fraction``, ``pred``, ``pred_conf``, ``kept`` and ``skip_reason`` (None when the
edit was made). Kept edits (and all edits with ``remove.save_all``) are saved as PNG; ``path`` points to the
edited image, or to the source image when no edit was saved.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from aspire.cache import ShardResult, StageStore
from aspire.config import RemoveConfig
from aspire.images import ImageError, load_rgb
from aspire.manifest import Row
from tasks.vision import Detection, Grounder, Inpainter, Segmenter, dilate
from tasks import retry_if_transient

log = logging.getLogger(__name__)

STAGE = "remove"
VERSION = 1
EDIT_SOURCE = "edit-remove"


def is_edit(row: Row) -> bool:
    """Whether a row is an edit attempt (of this stage or the background stage), not a dataset image."""
    return str(row.get("source", "")).startswith("edit-")


def load_for_editing(path: str, max_side: int) -> Image.Image:
    """RGB image (any mode or bit depth), downscaled so that its longer side is at most ``max_side``."""
    image = load_rgb(path)
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    return image


def attempt_row(row: Row, index: int, phrase: str | None, kind: str, source: str, **fields) -> Row:
    """An edit attempt of ``row``: a manifest row of its own (train split, the source's label and group)."""
    return {
        "image_id": f"{row['image_id']}::{kind}::{index}", "source_image_id": row["image_id"], "path": row["path"],
        "label": row["label"], "class_name": row["class_name"], "split": row["split"], "group": row.get("group"),
        "source": source, "phrase": phrase, "kept": False, "skip_reason": None, "pred": None, "pred_conf": None,
        **fields,
    }


def _big_enough(image: Image.Image, detection: Detection, config: RemoveConfig) -> bool:
    width, height = detection.box[2] - detection.box[0], detection.box[3] - detection.box[1]
    return width >= 2 and height >= 2 and width * height >= config.min_box_fraction * image.width * image.height


def plan_masks(image: Image.Image, phrases: list[str], detections: list[Detection], masks: list[np.ndarray],
               config: RemoveConfig) -> list[tuple[str, dict, np.ndarray | None]]:
    """Per phrase: (phrase, record fields, dilated union mask, or None with ``skip_reason`` set).

    ``masks`` belong to the detections that are big enough, in order."""
    kept = [d for d in detections if _big_enough(image, d, config)]
    out = []
    for phrase in phrases:
        mine = [(d, m) for d, m in zip(kept, masks) if d.phrase == phrase]
        fields = {"boxes": [[round(v, 1) for v in d.box] for d, _ in mine], "scores": [round(d.score, 4) for d, _ in mine]}
        if not mine:
            detected = any(d.phrase == phrase for d in detections)
            out.append((phrase, {**fields, "skip_reason": "boxes too small" if detected else "no detection"}, None))
            continue
        union = np.zeros((image.height, image.width), dtype=bool)
        for _, mask in mine:
            union |= mask
        union = dilate(union, config.dilate)
        fields["mask_fraction"] = round(float(union.mean()), 4)
        if not union.any():
            out.append((phrase, {**fields, "skip_reason": "empty mask"}, None))
        elif union.mean() > config.max_mask_fraction:
            out.append((phrase, {**fields, "skip_reason": f"mask covers {union.mean():.0%} of the image"}, None))
        else:
            out.append((phrase, fields, union))
    return out


def edit_batch(rows: list[Row], config: RemoveConfig, grounder: Grounder, segmenter: Segmenter,
               inpainter: Inpainter) -> list[tuple[Row, Image.Image | None]]:
    """Ground, segment and inpaint a batch of images: (attempt record, edited image or None) per phrase."""
    results: list[tuple[Row, Image.Image | None]] = []
    pending: list[tuple[Row, Image.Image, np.ndarray]] = []
    for row in rows:
        phrases = row.get("foreground") or []
        if row.get("extract_error") or not phrases:
            reason = f"no extraction: {row['extract_error']}" if row.get("extract_error") else "no foreground phrase"
            results.append((attempt_row(row, 0, None, "remove", EDIT_SOURCE, skip_reason=reason), None))
            continue
        try:
            image = load_for_editing(row["path"], config.max_side)
            detections = grounder.ground(image, phrases, row)  # one forward for all phrases
            boxes = [d.box for d in detections if _big_enough(image, d, config)]
            masks = segmenter.segment(image, boxes)  # one image embedding for all boxes
            planned = plan_masks(image, phrases, detections, masks, config)
        except ImageError as exc:
            planned, image = [(p, {"skip_reason": f"image: {exc.reason}"}, None) for p in phrases], None
        except Exception as exc:  # a backend failed on this image: record it, go on with the others
            log.warning("remove: %s failed: %s", row["image_id"], exc)
            planned, image = [(p, {"skip_reason": f"{type(exc).__name__}: {exc}"}, None) for p in phrases], None
        for k, (phrase, fields, mask) in enumerate(planned):
            record = attempt_row(row, k, phrase, "remove", EDIT_SOURCE, **fields)
            if mask is None:
                results.append((record, None))
            else:
                pending.append((record, image, mask))
    if pending:
        try:
            edited = inpainter.inpaint([im for _, im, _ in pending], [m for _, _, m in pending])
        except Exception as exc:
            log.warning("remove: inpainting failed for a batch of %d: %s", len(pending), exc)
            edited = [f"inpainting failed: {type(exc).__name__}: {exc}"] * len(pending)
        for (record, _, _), image in zip(pending, edited):
            if isinstance(image, str):
                results.append(({**record, "skip_reason": image}, None))
            else:
                results.append((record, image))
    return results


def classify_and_keep(results: list[tuple[Row, Image.Image | None]], classifier, out_dir: Path, save_all: bool) -> list[Row]:
    """Re-classify the edited images in one batch; keep (and save) the edits whose prediction flipped."""
    from aspire.classifier import predict_images

    model, classifier_config, _ = classifier
    edited = [(r, im) for r, im in results if im is not None]
    preds, confs = predict_images(model, [im for _, im in edited], classifier_config.image_size,
                                  classifier_config.batch_size, classifier_config.device)
    verdicts = {r["image_id"]: (p, c) for (r, _), p, c in zip(edited, preds, confs)}
    out = []
    for record, image in results:
        if image is not None:
            pred, conf = verdicts[record["image_id"]]
            record = {**record, "pred": pred, "pred_conf": round(conf, 6), "kept": pred != record["label"]}
            if record["kept"] or save_all:
                path = out_dir / f"{record['image_id'].replace('::', '__').replace('/', '_')}.png"
                image.save(path)
                record["path"] = str(path)
        out.append(record)
    return out


def attempt_stats(attempts: list[Row]) -> dict[str, int]:
    """Edits made, edits kept (prediction flipped) and attempts skipped (with a reason)."""
    return {"edits_tried": sum(a["skip_reason"] is None for a in attempts),
            "edits_kept": sum(a["kept"] for a in attempts),
            "skipped": sum(a["skip_reason"] is not None for a in attempts)}


def run_remove(rows: list[Row], config: RemoveConfig, grounder: Grounder, segmenter: Segmenter,
               inpainter: Inpainter, classifier, out_dir: Path) -> ShardResult:
    """Attempt every (held-out image, foreground phrase) removal of a shard; see the module docstring.

    Args:
        rows: the extract stage's rows (held-out images with ``foreground``).
        classifier: ``(model, ClassifierConfig, class_names)`` as :func:`tasks.classifier.load_classifier` returns.
        out_dir: where edited images are written.
    """
    originals = [r for r in rows if not is_edit(r)]
    attempts: list[Row] = []
    for i in tqdm(range(0, len(originals), config.batch_size), desc="remove", unit="batch", leave=False, disable=None):
        results = edit_batch(originals[i : i + config.batch_size], config, grounder, segmenter, inpainter)
        attempts += classify_and_keep(results, classifier, out_dir, config.save_all)
    return ShardResult(rows + attempts, [], attempt_stats(attempts))


@task(name="remove-shard", task_run_name="remove-shard-{index}", tags=["gpu"], cache_policy=NO_CACHE, retries=1,
      retry_condition_fn=retry_if_transient)
def remove_shard_task(store: StageStore, index: int, rows: list[Row], config: RemoveConfig, model_path: Path,
                      model_digest: str) -> dict:
    """Remove objects in one shard with the worker's models and commit it (skipped when already committed)."""
    from tasks.classifier import load_classifier
    from tasks.grounders import load_grounder
    from tasks.inpainters import load_inpainter
    from tasks.segmenters import load_segmenter

    backends = load_grounder(config), load_segmenter(config), load_inpainter(config)
    classifier = load_classifier(model_path, model_digest)
    return store.ensure_shard(index, rows, lambda shard_rows, out: run_remove(shard_rows, config, *backends,
                                                                            classifier, out), salt=model_digest)
