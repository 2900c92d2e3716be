"""The ASPIRE flow: stages composed in order, each a cached, sharded Prefect stage.

Stages so far: ``ingest`` (read the dataset, quarantine bad images) and ``holdout`` (ERM classifier,
predictions, the held-out set, the report's ``before`` block). Later stages plug in after ``holdout``.
The logic lives in ``tasks/``; this module plans keys, submits shard tasks, collects rows, publishes
artifacts and writes the report.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import as_completed
from tqdm.auto import tqdm

from aspire.cache import StageStore, shards, stage_key
from aspire.config import RunConfig, load_config
from aspire.manifest import Row, digest
from aspire.report import render_markdown, write_report
from aspire.synth import draw_benchmark
from flows.runtime import make_task_runner
from tasks import holdout, ingest

STAGES = ("ingest", "holdout")


@dataclass
class Plan:
    """The stores (hence keys) of every stage for one config, computed without running anything."""

    config: RunConfig
    listing: list[Row]
    stores: dict[str, StageStore] = field(default_factory=dict)


def plan_run(config: RunConfig) -> Plan:
    """Compute each stage's key from its config, backend and upstream key (the input digest chain)."""
    listing = ingest.list_dataset(config)
    shard_size = config.runner.shard_size
    plan = Plan(config, listing)
    ingest_key = stage_key(ingest.STAGE, ingest.VERSION, {"dataset": config.dataset, "shard_size": shard_size},
                           "pil", ingest.listing_digest(listing))
    classifier_key = stage_key("classifier", holdout.VERSION, {"classifier": config.classifier, "shard_size": shard_size},
                               f"torchvision:{config.classifier.arch}", ingest_key)
    holdout_key = stage_key(holdout.STAGE, holdout.VERSION, {"holdout": config.holdout}, "sample", classifier_key)
    for name, key in (("ingest", ingest_key), ("classifier", classifier_key), ("holdout", holdout_key)):
        plan.stores[name] = StageStore(config.workdir, name, key)
    return plan


def run_shards(runner, store: StageStore, rows: list[Row], shard_task, shard_size: int) -> tuple[list[Row], list[Row], dict]:
    """Run ``shard_task(store, index, rows)`` on ``runner`` for every shard not yet committed, then read all
    shards back in order.

    Committed shards are not even submitted: the markers decide, not Prefect's cache.
    """
    parts = shards(rows, shard_size)
    todo = [i for i, part in enumerate(parts) if not store.shard_is_current(i, part)]
    progress = create_progress_artifact(0.0, description=f"{store.stage}: shards committed")
    futures = [runner.submit(shard_task, {"store": store, "index": i, "rows": parts[i]}) for i in todo]
    with tqdm(total=len(parts), initial=len(parts) - len(todo), desc=store.stage, unit="shard") as bar:
        for future in as_completed(futures):
            future.result()  # re-raises the shard's error
            bar.update(1)
            update_progress_artifact(progress, 100.0 * bar.n / len(parts))
    update_progress_artifact(progress, 100.0)
    out_rows: list[Row] = []
    quarantine: list[Row] = []
    for i in range(len(parts)):
        result = store.read_shard(i)
        out_rows += result.rows
        quarantine += result.quarantine
    info = {"shards": len(parts), "shards_run": len(todo), "parts": [store.part_ref(store.shard_name(i)) for i in range(len(parts))]}
    return out_rows, quarantine, info


def _publish(name: str, summary: dict[str, Any]) -> None:
    """A one-table Prefect artifact per stage (keys must be lowercase letters, digits and dashes)."""
    shown = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    create_table_artifact([{"field": k, "value": str(v)} for k, v in shown.items()],
                          key=f"stage-{name}", description=f"ASPIRE stage {name}")


def run_stage(name: str, store: StageStore, force: bool, compute: Callable[[], tuple[list[Row], dict]]) -> tuple[list[Row], dict]:
    """Reuse a committed stage output, or compute it, commit it and publish its summary."""
    logger = get_run_logger()
    if force and store.root.exists():
        logger.info("%s: --force, removing %s", name, store.root)
        shutil.rmtree(store.root)
    marker = store.stage_marker()
    if marker is not None:
        logger.info("%s: cached (%s, %d rows)", name, store.key, marker["rows"])
        return store.read_rows(), {**marker["summary"], "status": "done", "cached": True, "seconds": 0.0}
    start = time.perf_counter()
    rows, summary = compute()
    summary = {**summary, "rows_out": len(rows), "key": store.key}
    store.commit_stage(rows, summary)
    summary = {**summary, "status": "done", "cached": False, "seconds": round(time.perf_counter() - start, 2)}
    _publish(name, summary)
    logger.info("%s: done in %.1f s (%d rows)", name, summary["seconds"], len(rows))
    return rows, summary


def _ingest(plan: Plan, runner) -> tuple[list[Row], dict]:
    store, size = plan.stores["ingest"], plan.config.runner.shard_size
    rows, quarantine, info = run_shards(runner, store, plan.listing, ingest.ingest_shard_task, size)
    for record in quarantine:
        get_run_logger().warning("quarantined %s: %s", record["path"], record["reason"])
    return rows, {**info, "rows_in": len(plan.listing), "failures": len(quarantine), "quarantine": quarantine}


def _holdout(plan: Plan, runner, rows: list[Row], force: bool) -> tuple[list[Row], dict]:
    config = plan.config
    store = plan.stores["classifier"]
    if force and store.root.exists():
        shutil.rmtree(store.root)
    trained = holdout.train_task(store, rows, config.classifier)
    predicted, quarantine, info = run_shards(runner, store, rows, holdout.predict_shard_task, config.runner.shard_size)
    parts = [store.part_ref(holdout.MODEL_PART), *info["parts"]]
    store.commit_stage(predicted, {"parts": parts, "rows_in": len(rows), "rows_out": len(predicted)})
    selected = holdout.select_holdout(predicted, config.holdout)
    summary = {
        "rows_in": len(rows), "failures": len(quarantine), "quarantine": quarantine,
        "trained": not trained.get("cached", False), "epochs": trained.get("epochs"),
        "train": sum(r["split"] == "train" for r in selected),
        "holdout": sum(r["holdout"] for r in selected),
        "before": holdout.evaluate(selected), "classifier_key": store.key, "predict_shards_run": info["shards_run"],
        "parts": parts,
    }
    return selected, summary


@flow(name="aspire", log_prints=False)
def aspire_flow(config_path: str, overrides: list[str] | None = None, until: str = STAGES[-1],
                force: list[str] | None = None) -> dict:
    """Run the ASPIRE stages in order up to ``until``; stages in ``force`` are recomputed.

    Args:
        config_path: YAML run config.
        overrides: ``section.key=value`` overrides.
        until: last stage to run (``aspire stage NAME`` runs NAME on its cached upstream).
        force: stage names whose committed output is discarded first.

    Returns:
        The run report (also written to ``<workdir>/report.json`` and ``report.md``).
    """
    if until not in STAGES:
        raise ValueError(f"until={until!r}: expected one of {STAGES}")
    force = set(force or [])
    config = load_config(config_path, overrides)
    if config.synth is not None:
        ensure_benchmark(config)
    plan = plan_run(config)
    summaries: dict[str, dict] = {}
    with make_task_runner(config.runner) as runner:  # one runner (thread pool or Dask cluster) per flow run
        ingested, summaries["ingest"] = run_stage("ingest", plan.stores["ingest"], "ingest" in force,
                                                  lambda: _ingest(plan, runner))
        if until != "ingest":
            _, summaries["holdout"] = run_stage("holdout", plan.stores["holdout"], "holdout" in force,
                                                lambda: _holdout(plan, runner, ingested, "holdout" in force))
    report = write_report(config.workdir, summaries)
    create_markdown_artifact(render_markdown(report), key="aspire-report", description="ASPIRE run report")
    return report


def ensure_benchmark(config: RunConfig) -> None:
    """Draw the synthetic benchmark into ``dataset.root`` unless the same draw is already there."""
    root = config.dataset.root
    stamp = root / ".synth-digest"
    wanted = digest(config.synth)
    if stamp.is_file() and stamp.read_text() == wanted:
        return
    get_run_logger().info("drawing the synthetic benchmark into %s", root)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    draw_benchmark(config.synth, tmp)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    stamp.write_text(wanted)
