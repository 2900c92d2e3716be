"""The ASPIRE flow: stages composed in order, each a cached, sharded Prefect stage.

Stages so far: ``ingest`` (read the dataset, quarantine bad images), ``classifier`` (ERM model and its
predictions), ``holdout`` (the held-out set, the report's ``before`` block), ``caption`` and ``extract``.
The logic lives in ``tasks/``; this module computes keys, submits shard tasks, collects rows, publishes
artifacts and writes the report.

Keys chain by content: a stage's input digest is the digest of its upstream stage's committed output, so a
change that leaves an upstream output identical (touching image files, a new shard size) reruns nothing
downstream, and a config change reruns its stage and what is downstream, never what is upstream.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections import Counter
from typing import Any, Callable, Iterator

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, \
    update_progress_artifact
from prefect.futures import as_completed
from tqdm.auto import tqdm

from aspire.cache import StageStore, shards, stage_key
from aspire.config import DatasetConfig, RunConfig, load_config
from aspire.manifest import Row, digest
from aspire.readers import read_dataset
from aspire.report import render_markdown, write_report
from aspire.synth import draw_background_bank, draw_benchmark, planted_found
from flows.runtime import make_task_runner
from tasks import background, caption, classifier, collapse, export, extract, generate, holdout, ingest, remove, retrain

STAGES = ("ingest", "classifier", "holdout", "caption", "extract", "remove", "background", "collapse",
          "personalize", "generate", "export", "retrain")


def stage_spec(config: RunConfig, name: str) -> tuple[int, Any, str]:
    """(version, the config that changes the stage's output, backend identity) of a stage."""
    specs: dict[str, Callable[[], tuple[int, Any, str]]] = {
        "ingest": lambda: (ingest.VERSION, config.dataset, "pil"),
        "classifier": lambda: (classifier.VERSION, classifier.key_config(config.classifier),
                               classifier.classifier_identity(config.classifier)),
        "holdout": lambda: (holdout.VERSION, config.holdout, "numpy"),
        "caption": lambda: (caption.VERSION, config.caption, caption.captioner_identity(config.caption)),
        "extract": lambda: (extract.VERSION, config.extract.model_dump(mode="json", exclude={"timeout", "max_retries"}),
                            extract.extractor_identity(config.extract)),
        "remove": lambda: (remove.VERSION, config.remove.model_dump(mode="json", exclude={"device", "batch_size"}),
                           remove_identity(config)),
        "background": lambda: (background.VERSION, config.background.model_dump(mode="json", exclude={"device", "batch_size"}),
                               background.editor_identity(config.background, config.remove)),
        "collapse": lambda: (collapse.VERSION, config.collapse, config.collapse.embedder),
        "personalize": lambda: personalize_spec(config),
        "generate": lambda: (generate.VERSION, config.generate.model_dump(mode="json", exclude={"device", "batch_size"}),
                             generate_identity(config)),
        "export": lambda: (export.VERSION, {"format": config.dataset.format}, "imagefolder"),
        "retrain": lambda: (retrain.VERSION, classifier.key_config(retrain.retrain_config(config.classifier, config.retrain)),
                            f"{config.retrain.method}: {classifier.classifier_identity(config.classifier)}"),
    }
    return specs[name]()


def remove_identity(config: RunConfig) -> str:
    from tasks.grounders import grounder_identity
    from tasks.inpainters import inpainter_identity
    from tasks.segmenters import segmenter_identity

    return " | ".join((grounder_identity(config.remove), segmenter_identity(config.remove),
                       inpainter_identity(config.remove)))


def personalize_spec(config: RunConfig) -> tuple[int, Any, str]:
    if config.personalize.backend == "none":
        return 1, {"backend": "none"}, "none"
    from tasks import personalize

    return (personalize.VERSION, config.personalize.model_dump(mode="json", exclude={"device"}),
            personalize.personalize_identity(config.personalize))


def generate_identity(config: RunConfig) -> str:
    if config.generate.backend == "composite":
        from tasks.grounders import grounder_identity
        from tasks.segmenters import segmenter_identity

        return f"composite: {background.BackgroundBank(config.background.bank).identity} | " \
               f"{grounder_identity(config.remove)} | {segmenter_identity(config.remove)}"
    from tasks.generate_sd import clip_identity, generator_identity

    clip = clip_identity(config.generate) if config.generate.clip_filter else "no clip filter"
    return f"{generator_identity(config.generate, config.personalize.model)} | {clip}"


def store_for(config: RunConfig, name: str, input_digest: str) -> StageStore:
    """The store of stage ``name`` for this config and input."""
    return StageStore(config.workdir, name, stage_key(name, *stage_spec(config, name), input_digest))


def chain(config: RunConfig, listing: list[Row]) -> Iterator[tuple[str, StageStore]]:
    """Committed-so-far walk of the stage chain: yields each stage's store while its upstream is committed.

    The caller may run a stage between two steps: the next store is computed from the committed output."""
    input_digest = ingest.listing_digest(listing)
    for name in STAGES:
        store = store_for(config, name, input_digest)
        yield name, store
        marker = store.stage_marker()
        if marker is None:
            return
        input_digest = marker["digest"]


def run_shards(runner, store: StageStore, rows: list[Row], shard_task, shard_size: int, salt: str = "",
               **task_args) -> tuple[list[Row], list[Row], dict]:
    """Run ``shard_task(store, index, rows, **task_args)`` on ``runner`` for every shard not yet committed,
    then read all shards back in order. Committed shards are not even submitted: the markers decide."""
    parts = shards(rows, shard_size)
    todo = [i for i, part in enumerate(parts) if not store.shard_is_current(i, part, salt)]
    progress = create_progress_artifact(0.0, description=f"{store.stage}: shards committed")
    futures = [runner.submit(shard_task, {"store": store, "index": i, "rows": parts[i], **task_args}) for i in todo]
    with tqdm(total=len(parts), initial=len(parts) - len(todo), desc=store.stage, unit="shard") as bar:
        for future in as_completed(futures):
            future.result()  # re-raises the shard's error
            bar.update(1)
            update_progress_artifact(progress, 100.0 * bar.n / len(parts))
    update_progress_artifact(progress, 100.0)
    out_rows: list[Row] = []
    quarantine: list[Row] = []
    stats: dict[str, float] = {}
    for i in range(len(parts)):
        result = store.read_shard(i)
        out_rows += result.rows
        quarantine += result.quarantine
        for key, value in result.stats.items():
            stats[key] = stats.get(key, 0) + value
    info = {"shards": len(parts), "shards_run": len(todo), "stats": stats, "quarantine": quarantine,
            "rows_in": len(rows), "failures": len(quarantine),
            "parts": [store.part_ref(store.shard_name(i)) for i in range(len(parts))]}
    return out_rows, quarantine, info


def _artifact_key(config: RunConfig, name: str) -> str:
    """Artifact keys per workdir (lowercase letters, digits, dashes), so runs of different datasets do
    not overwrite each other's history."""
    slug = re.sub(r"[^a-z0-9]+", "-", config.workdir.name.lower()).strip("-") or "run"
    return f"{slug}-{digest(str(config.workdir))[:6]}-{name}"


def _publish(config: RunConfig, name: str, summary: dict[str, Any]) -> None:
    shown = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    create_table_artifact([{"field": k, "value": str(v)} for k, v in shown.items()],
                          key=_artifact_key(config, f"stage-{name}"), description=f"ASPIRE stage {name}")


def run_stage(config: RunConfig, name: str, store: StageStore, force: bool,
              compute: Callable[[], tuple[list[Row], dict, list[str]]]) -> tuple[list[Row], dict]:
    """Reuse a committed stage output, or compute it, commit it and publish its summary.

    ``compute()`` returns (rows, summary, parts the output depends on)."""
    logger = get_run_logger()
    if force and store.root.exists():
        logger.info("%s: --force, removing %s", name, store.root)
        shutil.rmtree(store.root)
    marker = store.stage_marker()
    if marker is not None:
        logger.info("%s: cached (%s, %d rows)", name, store.key, marker["rows"])
        summary = {**marker["summary"], "status": "done", "cached": True, "seconds": 0.0}
        _publish(config, name, summary)
        return store.read_rows(), summary
    start = time.perf_counter()
    rows, summary, parts = compute()
    summary = {**summary, "rows_out": len(rows), "key": store.key}
    store.commit_stage(rows, summary, parts)
    summary = {**summary, "status": "done", "cached": False, "seconds": round(time.perf_counter() - start, 2)}
    _publish(config, name, summary)
    logger.info("%s: done in %.1f s (%d rows)", name, summary["seconds"], len(rows))
    return rows, summary


# -- the stages ------------------------------------------------------------------------------------------


def _ingest(config: RunConfig, runner, store: StageStore, listing: list[Row], stores: dict[str, StageStore]):
    rows, quarantine, info = run_shards(runner, store, listing, ingest.ingest_shard_task, config.runner.shard_size)
    for record in quarantine:
        get_run_logger().warning("quarantined %s: %s", record["path"], record["reason"])
    return rows, info, info["parts"]


def _classifier(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    trained = classifier.train_task(store, rows, config.classifier)
    model_digest = trained["files"][classifier.MODEL_FILE]
    predicted, _, info = run_shards(runner, store, rows, classifier.predict_shard_task, config.runner.shard_size,
                                    salt=model_digest, model_digest=model_digest)
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
    captioned, _, info = run_shards(runner, store, held, caption.caption_shard_task, config.runner.shard_size,
                                    config=config.caption)
    seconds, n = info["stats"].get("seconds", 0.0), info["stats"].get("captioned", 0)
    return captioned, {**info, "seconds_per_image": round(seconds / n, 4) if n else None}, info["parts"]


def _extract(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    cache_dir = config.workdir / "cache" / "extract"
    extracted, _, info = run_shards(runner, store, rows, extract.extract_shard_task, config.runner.shard_size,
                                    config=config.extract, cache_dir=cache_dir)
    info = {**info, "failures": sum(r["extract_error"] is not None for r in extracted),
            "errors": [{"image_id": r["image_id"], "reason": r["extract_error"]} for r in extracted if r["extract_error"]]}
    return extracted, info, info["parts"]


def _model(stores: dict[str, StageStore]) -> dict:
    """The committed classifier's path and digest, for the stages that re-classify edits."""
    store = stores["classifier"]
    return {"model_path": store.part_dir(classifier.MODEL_PART) / classifier.MODEL_FILE,
            "model_digest": store.read_marker(classifier.MODEL_PART)["files"][classifier.MODEL_FILE]}


def _edit_summary(info: dict, rows: list[Row]) -> dict:
    reasons = Counter(r["skip_reason"] for r in rows if remove.is_edit(r) and r["skip_reason"])
    return {**info, "edits_tried": info["stats"].get("edits_tried", 0), "edits_kept": info["stats"].get("edits_kept", 0),
            "skip_reasons": dict(reasons.most_common()), "failures": sum(reasons.values())}


def _remove(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    model = _model(stores)
    out, _, info = run_shards(runner, store, rows, remove.remove_shard_task, config.runner.shard_size,
                              salt=model["model_digest"], config=config.remove, **model)
    return out, _edit_summary(info, [r for r in out if r.get("source") == remove.EDIT_SOURCE]), info["parts"]


def _background(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    model = _model(stores)
    out, _, info = run_shards(runner, store, rows, background.background_shard_task, config.runner.shard_size,
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
                          key=_artifact_key(config, "top-k"), description="ASPIRE top-k spurious feature groups per class")


def _summary_of(stores: dict[str, StageStore], name: str) -> dict:
    return stores[name].stage_marker()["summary"]


def _personalize(config: RunConfig, runner, store: StageStore, rows: list[Row], stores: dict[str, StageStore]):
    summary = {"rows_in": len(rows), "failures": 0, "tokens": {}, "skipped": {}}
    if config.personalize.backend == "none":
        return rows, {**summary, "skipped": {"*": "personalize.backend is none"}}, []
    from tasks import personalize

    parts = []
    for name in sorted({r["class_name"] for r in rows if not remove.is_edit(r)}):
        paths, rule, reason = personalize.select_training_images(rows, name, config.personalize.min_images)
        if not paths:
            summary["skipped"][name] = reason
            continue
        marker = personalize.personalize_class_task(store, name, [str(p) for p in paths], config.personalize)
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
    spurious = _summary_of(stores, "collapse")["spurious"]
    tokens = {c: t[:2] for c, t in _summary_of(stores, "personalize")["tokens"].items()}
    sources = {c: r[:64] for c, r in generate.core_sources(rows).items()}
    made, quarantine, info = run_shards(runner, store, jobs, generate.generate_shard_task, config.runner.shard_size,
                                        config=config.generate, remove=config.remove, background=config.background,
                                        model=config.personalize.model, tokens=tokens, spurious=spurious, sources=sources)
    summary = {**info, "planned": counts, "generated": len(made), "failures": len(quarantine)}
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
    trained = classifier.train_task(store, rows, settings)
    model_digest = trained["files"][classifier.MODEL_FILE]
    evaluated = [r for r in rows if r["split"] in ("val", "test")]
    predicted, _, info = run_shards(runner, store, evaluated, classifier.predict_shard_task, config.runner.shard_size,
                                    salt=model_digest, model_digest=model_digest)
    summary = {**info, "trained": not trained["cached"], "epochs": trained.get("epochs"),
               "train_rows": sum(r["split"] == "train" for r in rows), "after": holdout.evaluate(predicted)}
    return predicted, summary, [store.part_ref(classifier.MODEL_PART), *info["parts"]]


COMPUTE = {"ingest": _ingest, "classifier": _classifier, "holdout": _holdout, "caption": _caption, "extract": _extract,
           "remove": _remove, "background": _background, "collapse": _collapse, "personalize": _personalize,
           "generate": _generate, "export": _export, "retrain": _retrain}


@flow(name="aspire")
def aspire_flow(config_path: str, overrides: list[str] | None = None, until: str = STAGES[-1],
                force: list[str] | None = None) -> dict:
    """Run the ASPIRE stages in order up to ``until``; stages in ``force`` are recomputed.

    Args:
        config_path: YAML run config.
        overrides: ``section.key=value`` overrides.
        until: last stage to run (``aspire stage NAME`` runs NAME on its cached upstream).
        force: stage names whose committed output is discarded first.

    Returns:
        The run report (also written to ``<workdir>/report.json`` and ``report.md``): the stages run here,
        plus the committed stages after ``until`` that still match.
    """
    if until not in STAGES:
        raise ValueError(f"until={until!r}: expected one of {STAGES}")
    force = set(force or [])
    config = load_config(config_path, overrides)
    if config.synth is not None:
        ensure_benchmark(config)
    listing = ingest.list_dataset(config)
    summaries: dict[str, dict] = {}
    rows, edit_rows = listing, None
    with make_task_runner(config.runner) as runner:  # one runner (thread pool or Dask cluster) per flow run
        stores: dict[str, StageStore] = {}
        for name, store in chain(config, listing):
            stores[name] = store
            if STAGES.index(name) > STAGES.index(until):  # report what is committed downstream, run nothing
                marker = store.stage_marker()
                if marker is not None:
                    summaries[name] = {**marker["summary"], "status": "done", "cached": True, "seconds": 0.0}
                continue
            rows, summaries[name] = run_stage(config, name, store, name in force,
                                              lambda: COMPUTE[name](config, runner, store, rows, stores))
            if name == "generate":  # held-out originals, edits and generated images: the report's grid
                edit_rows = rows
    report = write_report(config.workdir, summaries, edit_rows)
    create_markdown_artifact(render_markdown(report), key=_artifact_key(config, "report"),
                             description="ASPIRE run report")
    return report


def ensure_benchmark(config: RunConfig) -> None:
    """Draw the synthetic benchmark into ``dataset.root`` unless the same draw is already there."""
    root = config.dataset.root
    stamp = root / ".synth-digest"
    wanted = digest(config.synth)
    if stamp.is_file() and stamp.read_text() == wanted:
        return
    get_run_logger().info("drawing the synthetic benchmark into %s", root)
    tmp = root.with_name(f"{root.name}.tmp-{uuid.uuid4().hex[:8]}")
    draw_benchmark(config.synth, tmp)
    draw_background_bank(config.synth, tmp / "backgrounds")  # for the composite background editor
    (tmp / ".synth-digest").write_text(wanted)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
