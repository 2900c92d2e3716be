"""What each stage of the flow does: gather its inputs, run its shards or its pure function, summarise.

One ``_<stage>(config, runner, store, rows, stores)`` per stage returns (output rows, summary, the parts the
output depends on); :data:`COMPUTE` maps stage names to them. The logic itself lives in ``tasks/``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from aspire.cache import StageStore
from aspire.config import DatasetConfig, RunConfig
from aspire.manifest import Row
from aspire.metrics import lost_images, paired_changes, selection_key
from aspire.readers import read_dataset
from aspire.synth import planted_found
from flows.running import StageFailed, artifact_key, run_shards
from tasks import (
    background,
    caption,
    classifier,
    collapse,
    export,
    extract,
    generate,
    holdout,
    ingest,
    quote,
    remove,
    retrain,
)


def on_gpu(task, *devices: str):
    """``task`` keeping its ``gpu`` tag only when one of the devices it runs on is CUDA in this run, so a
    ``gpu`` concurrency limit throttles the tasks that use the GPU and nothing else."""
    from aspire.lazy import resolve_device

    if any(resolve_device(d).type == "cuda" for d in devices):
        return task
    stripped = task.with_options()  # with_options(tags=set()) would keep the old tags (an empty set is falsy)
    stripped.tags = set(task.tags) - {"gpu"}
    return stripped


def _ingest(config: RunConfig, runner, store: StageStore, listing: list[Row], stores: dict[str, StageStore]):
    rows, quarantine, info = run_shards(runner, store, listing, ingest.ingest_shard_task, config.runner.shard_size)
    for record in quarantine:
        get_run_logger().warning("quarantined %s: %s", record["path"], record["reason"])
    return rows, info, info["parts"]


def _classifier(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    device = config.classifier.device
    trained = on_gpu(classifier.train_task, device)(store, quote(rows), config.classifier)  # quote: see run_shards
    model_digest = trained["files"][classifier.MODEL_FILE]
    predicted, _, info = run_shards(runner, store, rows, on_gpu(classifier.predict_shard_task, device),
                                    config.runner.shard_size, salt=model_digest, model_digest=model_digest)
    summary = {**info, "trained": not trained["cached"], "epochs": trained.get("epochs"),
               "final_train_acc": trained.get("final_train_acc")}
    return predicted, summary, [store.part_ref(classifier.MODEL_PART), *info["parts"]]


def _holdout(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    selected = holdout.select_holdout(rows, config.holdout)
    summary = {"rows_in": len(rows), "failures": 0, "train": sum(r["split"] == "train" for r in selected),
               "holdout": sum(r["holdout"] for r in selected), "before": holdout.evaluate(selected)}
    return selected, summary, []


def _caption(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    held = [r for r in rows if r.get("holdout")]
    devices = [config.caption.device] if config.caption.backend in ("git", "blip") else []
    captioned, _, info = run_shards(runner, store, held, on_gpu(caption.caption_shard_task, *devices),
                                    config.runner.shard_size, config=config.caption)
    seconds, n = info["stats"].get("seconds", 0.0), info["stats"].get("captioned", 0)
    return captioned, {**info, "seconds_per_image": round(seconds / n, 4) if n else None}, info["parts"]


def _extract(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    cache_dir = config.workdir / "cache" / "extract"
    extracted, _, info = run_shards(runner, store, rows, extract.extract_shard_task, config.runner.shard_size,
                                    config=config.extract, cache_dir=cache_dir)
    info = {**info, "failures": sum(r["extract_error"] is not None for r in extracted),
            "errors": [{"image_id": r["image_id"], "reason": r["extract_error"]} for r in extracted if r["extract_error"]]}
    captioned = sum(bool(r.get("caption")) for r in rows)
    failed = int(info["stats"].get("retryable", 0))
    if failed and failed > config.extract.max_failed * captioned:
        reason = Counter(e["reason"] for e in info["errors"]).most_common(1)[0][0]
        raise StageFailed(f"extract: {failed} of {captioned} captions failed (extract.max_failed="
                          f"{config.extract.max_failed}), most often: {reason}. The answers received are cached; "
                          "rerun once the server works and only the failed captions are sent again.")
    return extracted, info, info["parts"]


def _model(stores: dict[str, StageStore]) -> dict:
    """The committed classifier's path and digest, for the stages that re-classify edits."""
    store = stores["classifier"]
    return {"model_path": classifier.model_file(store),
            "model_digest": store.read_marker(classifier.MODEL_PART)["files"][classifier.MODEL_FILE]}


def _edit_summary(info: dict, rows: list[Row]) -> dict:
    reasons = Counter(r["skip_reason"] for r in rows if remove.is_edit(r) and r["skip_reason"])
    return {**info, "edits_tried": info["stats"].get("edits_tried", 0), "edits_kept": info["stats"].get("edits_kept", 0),
            "skip_reasons": dict(reasons.most_common()), "failures": sum(reasons.values())}


def _disabled(rows: list[Row], what: str) -> tuple[list[Row], dict, list[str]]:
    """An edit stage switched off (ASPIRE Table 2's ablations): its input passes through, no edit is tried."""
    get_run_logger().info("%s is switched off (an ablation): no edit", what)
    return rows, {"rows_in": len(rows), "failures": 0, "edits_tried": 0, "edits_kept": 0, "skip_reasons": {},
                  "disabled": True}, []


def _remove(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    if not config.remove.enabled:
        return _disabled(rows, "remove.enabled")
    model = _model(stores)
    task = on_gpu(remove.remove_shard_task, config.remove.device, config.classifier.device)
    out, _, info = run_shards(runner, store, rows, task, config.runner.shard_size,
                              salt=model["model_digest"], config=config.remove, **model)
    return out, _edit_summary(info, [r for r in out if r.get("source") == remove.EDIT_SOURCE]), info["parts"]


def _background(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    if not config.background.enabled:
        return _disabled(rows, "background.enabled")
    model = _model(stores)
    task = on_gpu(background.background_shard_task, config.background.device, config.classifier.device)
    out, _, info = run_shards(runner, store, rows, task, config.runner.shard_size,
                              salt=model["model_digest"], config=config.background, remove=config.remove, **model)
    return out, _edit_summary(info, [r for r in out if r.get("source") == background.EDIT_SOURCE]), info["parts"]


def _collapse(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    out, summary = collapse.run_collapse(rows, config.collapse, collapse.load_embedder(config.collapse))
    if config.synth is not None:  # the benchmark knows what was planted: say whether it was found
        summary["planted"] = planted_found(config.synth, summary["spurious"])
    _publish_top_k(config, summary["top_k"])
    return out, summary, []


def _publish_top_k(config: RunConfig, table: dict) -> None:
    rows = [{"class": c, "rank": i + 1, "edits flipped": g["count"], "phrases": ", ".join(g["phrases"])}
            for c, groups in table.items() for i, g in enumerate(groups)]
    create_table_artifact(rows or [{"class": "-", "rank": "-", "edits flipped": 0, "phrases": "no edit flipped a prediction"}],
                          key=artifact_key(config, "top-k"), description="ASPIRE top-k spurious feature groups per class")


def _summary_of(stores: dict[str, StageStore], name: str) -> dict:
    return stores[name].stage_marker()["summary"]


NOTHING_CLAIMED = "no spurious feature found in any class: nothing to augment against"
"""Why personalize and generate make nothing when collapse claims no feature for any class. When some class has
one, every class learns from its top-k edits (:func:`tasks.collapse.training_edits`), claimed or not."""


def _personalize(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    summary = {"rows_in": len(rows), "failures": 0, "tokens": {}, "skipped": {}, "learned_from": {}}
    if config.personalize.backend == "none":
        return rows, {**summary, "skipped": {"*": "personalize.backend is none"}}, []
    if not _summary_of(stores, "collapse")["spurious"]:
        return rows, {**summary, "skipped": {"*": NOTHING_CLAIMED}}, []
    from tasks import personalize

    parts = []
    for name in sorted({r["class_name"] for r in rows if not remove.is_edit(r)}):
        paths, rule, reason = personalize.select_training_images(rows, name, config.personalize.min_images)
        if not paths:
            summary["skipped"][name] = reason
            continue
        try:
            marker = on_gpu(personalize.personalize_class_task, config.personalize.device)(
                store, name, [str(p) for p in paths], config.personalize)
        except ValueError as exc:  # e.g. an initial word the tokenizer splits: this class is skipped, with why
            summary["skipped"][name] = str(exc).splitlines()[0]
            get_run_logger().warning("personalize: %s skipped: %s", name, summary["skipped"][name])
            continue
        summary["learned_from"][name] = {"rule": rule, "initializer": marker.get("initializer"),
                                         "images": [Path(p).name for p in paths]}
        part = personalize.part_name(name)
        summary["tokens"][name] = [str(store.part_dir(part) / personalize.EMBEDS_FILE), marker["placeholder"], rule]
        parts.append(store.part_ref(part))
    summary["failures"] = len(summary["skipped"])
    return rows, summary, parts


def _generate(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    dataset_rows = stores["holdout"].read_rows()
    counts = generate.images_per_class(dataset_rows, config.generate)
    labels = {r["class_name"]: r["label"] for r in dataset_rows}
    jobs = generate.plan_jobs(counts, labels, config.generate.seed)
    if config.generate.per_class_choices():  # several multiples: the retrain stage chooses on validation
        jobs = generate.mark_choices(jobs, {m: generate.images_per_class(dataset_rows, config.generate, m)
                                            for m in config.generate.per_class_choices()})
    collapse_summary = _summary_of(stores, "collapse")
    # every class avoids every phrase of its top-k groups (ASPIRE's rule), claimed by the report or not: a feature
    # the classifier leans on alongside another flips few edits and may miss the claim's threshold
    spurious = {c: [g["phrases"] for g in groups] for c, groups in collapse_summary["top_k"].items() if groups}
    if config.generate.learn_from == "kept-edits" and not collapse_summary["spurious"]:
        # the report claims no feature in any class (the negative control's case): nothing to augment against
        return rows, {"rows_in": len(rows), "failures": 0, "generated": 0, "planned": counts,
                      "skipped": {c: NOTHING_CLAIMED for c in counts}}, []
    tokens = {c: t[:2] for c, t in _summary_of(stores, "personalize")["tokens"].items()}
    if config.generate.backend == "edits":  # Table 2's ablation: the kept edits themselves, nothing generated
        made = generate.edits_as_augmentations(rows, config.personalize.min_images)
        summary = {"rows_in": len(rows), "failures": 0, "generated": len(made), "planned": counts,
                   "from_edits": dict(Counter(r["class_name"] for r in made))}
        return rows + made, summary, []
    exemplars, skipped = {}, {}
    if config.generate.backend == "composite":  # a class with nothing to imitate gets no images, and says why
        exemplars = generate.generator_exemplars(rows, config.generate.learn_from, config.personalize.min_images)
        skipped = {c: "nothing to learn from: " + collapse.training_edits(rows, c, config.personalize.min_images)[2]
                   for c in counts if c not in exemplars}
        jobs = [j for j in jobs if j["class_name"] in exemplars]
    devices = [config.generate.device] if config.generate.backend == "textual-inversion" else []
    made, quarantine, info = run_shards(runner, store, jobs, on_gpu(generate.generate_shard_task, *devices),
                                        config.runner.shard_size,
                                        config=config.generate, remove=config.remove, model=config.personalize.model,
                                        tokens=tokens, spurious=spurious, exemplars=exemplars, bank=config.background.bank)
    summary = {**info, "planned": counts, "skipped": skipped, "generated": len(made), "failures": len(quarantine),
               "exemplars": {c: len(e) for c, e in exemplars.items()}}
    return rows + made, summary, info["parts"]


def _export(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    made = [r for r in rows if r.get("source") == "generated"]
    augmented = export.augmented_rows(stores["holdout"].read_rows(), made)
    waterbirds = config.dataset.format == "waterbirds"
    marker = store.ensure_part(export.DATASET_PART, lambda tmp: export.run_export(augmented, tmp / "data", waterbirds)[1])
    folder = store.part_dir(export.DATASET_PART) / "data"
    exported = read_dataset(DatasetConfig(format="hf-imagefolder", root=folder))  # read back as users will
    summary = {"rows_in": len(rows), "failures": 0, "folder": str(folder), "rows": len(exported),
               "generated": marker.get("generated"), "by_split_class_source": marker.get("by_split_class_source")}
    return exported, summary, [store.part_ref(export.DATASET_PART)]


def _retrain(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    settings = retrain.retrain_config(config.classifier, config.retrain)
    received = len(rows)
    marked = any(r.get("source") == "generated" and r.get("per_class_from") is not None for r in rows)
    choices = config.generate.per_class_choices() if marked else None
    probed: dict[str, list[Row]] = {}  # the cue probe's predictions (a synthetic benchmark, ERM)
    if config.retrain.method != "erm":  # a robust trainer: one committed part with its val/test predictions
        rows, grouping = retrain.group_rows(store, rows, config.retrain, config.caption,
                                            _summary_of(stores, "collapse")["spurious"], stores["caption"].read_rows())
        args = config.retrain.trainer_args(config.retrain.method, str(classifier.model_file(stores["classifier"])))

        def fit(part: str, subset: list[Row]) -> list[Row]:  # the val and test predictions
            return on_gpu(retrain.robust_task, settings.device)(store, quote(subset), settings, config.retrain.method,
                                                                args, part)

        part, rows, summary = _choose_multiple(choices, rows, retrain.ROBUST_PART, fit)
        predicted = fit(part, rows)
        summary |= {"method": config.retrain.method, "grouping": grouping}
        parts = [store.part_ref(part)]
    elif not any(r.get("source") == "generated" for r in rows):  # the augmented set is the original set
        evaluated = {r["image_id"] for r in rows if r["split"] in ("val", "test")}
        predicted = [r for r in stores["classifier"].read_rows() if r["image_id"] in evaluated]
        summary, parts = {"trained": False, "kept_model_before": retrain.KEPT_MODEL_BEFORE}, []
        if config.synth is not None:  # one model: probed once, its answers are before's and after's
            cues, rows_of = classifier.probe_cues(config.synth, {"before": classifier.model_file(stores["classifier"])})
            summary["cues"] = {"before": cues["before"], "after": cues["before"]}
            probed = {"before": rows_of["before"], "after": rows_of["before"]}
    else:
        models: dict[str, dict] = {}
        val_results: dict[str, list] = {}  # part: its val predictions, shard by shard

        def fit(part: str, subset: list[Row]) -> list[Row]:  # the val predictions (the test waits for the choice)
            models[part] = on_gpu(classifier.train_task, settings.device)(store, quote(subset), settings, part)
            val, size = [r for r in subset if r["split"] == "val"], config.runner.shard_size
            path, model_digest = classifier.model_file(store, part), models[part]["files"][classifier.MODEL_FILE]
            val_results[part] = [classifier.run_predict(val[i:i + size], path, model_digest)  # a shard at a time
                                 for i in range(0, len(val), size)]
            return [r for result in val_results[part] for r in result.rows]

        part, rows, summary = _choose_multiple(choices, rows, classifier.MODEL_PART, fit)
        trained = models.get(part) or on_gpu(classifier.train_task, settings.device)(store, quote(rows), settings, part)
        model_digest = trained["files"][classifier.MODEL_FILE]
        known = val_results.get(part)  # the chosen model's val predictions are not computed twice
        evaluated = [r for r in rows if r["split"] == "test" or (r["split"] == "val" and known is None)]
        predicted, _, info = run_shards(runner, store, evaluated, on_gpu(classifier.predict_shard_task, settings.device),
                                        config.runner.shard_size, salt=model_digest, model_digest=model_digest, part=part)
        for result in known or []:
            predicted += result.rows
            info["quarantine"] += result.quarantine
        info["failures"] = len(info["quarantine"])
        summary |= {**info, "trained": not trained["cached"], "epochs": trained.get("epochs")}
        parts = [store.part_ref(part), *info["parts"]]
        if config.synth is not None:  # a synthetic benchmark: which cue the models follow beside the test groups
            summary["cues"], probed = classifier.probe_cues(
                config.synth, {"before": classifier.model_file(stores["classifier"]), "after": classifier.model_file(store, part)})
    before = stores["classifier"].read_rows()
    summary |= {"rows_in": received, "failures": summary.get("failures", 0),
                "train_rows": sum(r["split"] == "train" for r in rows), "after": holdout.evaluate(predicted, rows),
                "test_changes": paired_changes(before, predicted), "test_lost": lost_images(before, predicted, probed=probed)}
    return predicted, summary, parts


def _choose_multiple(choices: list[float] | None, rows: list[Row], part: str,
                     fit: Callable[[str, list[Row]], list[Row]]) -> tuple[str, list[Row], dict]:
    """With several ``generate.per_class`` multiples: train one model per multiple (``fit(part, rows)`` returns
    its validation predictions) on each class's first generated images, and keep the best on validation
    worst-group accuracy (worst class without group labels), then average, then the smaller multiple.
    Returns the chosen model's part, its rows and the summary's ``per_class`` entry (none with one multiple)."""
    if not choices:
        return part, rows, {}
    if not any(r["split"] == "val" for r in rows):
        raise StageFailed(f"retrain: generate.per_class lists {len(choices)} multiples to choose on validation, but "
                          "the dataset has no val split; give one multiple, or a dataset with a val split")
    table, best = [], None
    for multiple in choices:
        subset = generate.with_multiple(rows, multiple)
        val = holdout.evaluate(fit(retrain.multiple_part(part, multiple), subset), subset).get("val") or {}
        line = {"per_class": multiple, "generated": sum(r.get("source") == "generated" for r in subset),
                "val_worst_group_acc": val.get("worst_group_acc"), "val_avg_acc": val.get("avg_acc")}
        table.append(line)
        if best is None or selection_key(line, by_group=True) > selection_key(best, by_group=True):
            best = line
    get_run_logger().info("retrain: per_class %g chosen on validation (%s)", best["per_class"], ", ".join(
        f"{t['per_class']:g}x: worst group {t['val_worst_group_acc']}, average {t['val_avg_acc']}" for t in table))
    chosen = best["per_class"]
    return retrain.multiple_part(part, chosen), generate.with_multiple(rows, chosen), {"per_class": {"choices": table, "chosen": chosen}}


COMPUTE = {"ingest": _ingest, "classifier": _classifier, "holdout": _holdout, "caption": _caption, "extract": _extract,
           "remove": _remove, "background": _background, "collapse": _collapse, "personalize": _personalize,
           "generate": _generate, "export": _export, "retrain": _retrain}


