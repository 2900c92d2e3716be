"""Running a stage: committed outputs reused, missing shards submitted to the task runner, summaries
published as Prefect artifacts."""

from __future__ import annotations

import errno
import json
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import TagsContext
from prefect.futures import as_completed
from tqdm.auto import tqdm

from aspire.cache import StageStore, retry_pending, shards
from aspire.config import RunConfig
from aspire.manifest import Row, digest
from tasks import quote

PROGRESS_EVERY_S = 1.0
"""Seconds between updates of a stage's progress artifact: each is an API call from the flow's thread (~50 ms
under load), which per shard made a cheap stage's time grow with its shard count."""


def run_shards(runner, store: StageStore, rows: list[Row], shard_task, shard_size: int, salt: str = "",
               **task_args) -> tuple[list[Row], list[Row], dict]:
    """Run ``shard_task(store, index, rows, **task_args)`` on ``runner`` for every shard not yet committed,
    then read all shards back in order. Committed shards are not even submitted: the markers decide.
    ``shards_run`` counts the shards this run computed (not those it found committed by a concurrent run)."""
    parts = shards(rows, shard_size)
    todo = [i for i, part in enumerate(parts) if not store.shard_is_current(i, part, salt)]
    progress = create_progress_artifact(0.0, key=f"{workdir_slug(store.workdir)}-{store.stage}-progress",
                                        description=f"{store.stage}: shards committed")
    # quote(): Prefect would otherwise walk every row of every task's parameters (0.4 s per 256-row shard here)
    futures = [runner.submit(shard_task, {"store": store, "index": i, "rows": quote(parts[i]), **task_args})
               for i in todo]
    computed = 0  # a shard another run committed while this one waited for its lock is reused, not computed
    done = len(parts) - len(todo)  # counted here: a disabled bar (no terminal) does not count its updates
    reported = time.monotonic()
    with tqdm(total=len(parts), initial=done, desc=store.stage, unit="shard", disable=None) as bar:
        for future in as_completed(futures):
            computed += not future.result().get("cached")  # result() re-raises the shard's error
            done += 1
            bar.update(1)
            if time.monotonic() - reported >= PROGRESS_EVERY_S:
                update_progress_artifact(progress, 100.0 * done / len(parts))
                reported = time.monotonic()
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
    info = {"shards": len(parts), "shards_run": computed, "stats": stats, "quarantine": quarantine,
            "rows_in": len(rows), "failures": len(quarantine),
            "parts": [store.part_ref(store.shard_name(i)) for i in range(len(parts))]}
    return out_rows, quarantine, info


STORAGE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}
"""``errno`` values of an ``OSError`` that stops a run because of its storage, which the user can fix and resume."""


def storage_error(exc: BaseException | None) -> OSError | None:
    """The ``OSError`` of a full disk (quota, read-only, no permission) that is ``exc`` or caused it, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRORS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def storage_problem(exc: OSError, workdir: Path | None = None) -> str:
    """One line for a run stopped by its storage (disk full, quota, read-only, no permission)."""
    where = f" writing {exc.filename}" if exc.filename else (f" under {workdir}" if workdir else "")
    return (f"stopped: {STORAGE_ERRORS[exc.errno]}{where} ({exc.strerror}). Committed work is kept and nothing "
            "half-written is marked done: free space (or fix the permissions) and rerun the same command to resume.")


class StageFailed(RuntimeError):
    """A stage whose failures pass its threshold (e.g. most captions' extraction failed): the run stops with this
    one-line message; what was committed stays, so a rerun redoes only what failed."""


def artifact_key(config: RunConfig, name: str) -> str:
    """Artifact keys per workdir name (lowercase letters, digits, dashes), so runs of different datasets do
    not overwrite each other's history: ``demo-report``, ``demo-stage-03-holdout``."""
    return f"{workdir_slug(config.workdir)}-{name}"


def workdir_slug(workdir) -> str:
    """The workdir's name in lowercase letters, digits and dashes (what artifact keys allow)."""
    return re.sub(r"[^a-z0-9]+", "-", Path(workdir).name.lower()).strip("-") or "run"


NESTED_CHARACTERS = 1500  # a nested summary field longer than this is cut in the table (DONE.json has it whole)


def summary_table(summary: dict[str, Any]) -> list[dict[str, str]]:
    """A stage summary as (field, value) rows: scalars as they are, nested fields (holdout's ``before``,
    remove's ``skip_reasons``) as compact JSON, the quarantine as its count (the report lists it)."""
    table = []
    for key, value in summary.items():
        if key == "quarantine":
            value = f"{len(value)} records (report: Quarantine)"
        elif key == "parts":
            continue
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, separators=(", ", ": "), default=str)
            if len(value) > NESTED_CHARACTERS:
                value = value[:NESTED_CHARACTERS] + " ... (cut; the stage's DONE.json has it all)"
        table.append({"field": key, "value": str(value)})
    return table


def publish(config: RunConfig, name: str, summary: dict[str, Any]) -> None:
    from flows.keys import STAGES

    number = f"{STAGES.index(name) + 1:02d}" if name in STAGES else "00"
    create_table_artifact(summary_table(summary), key=artifact_key(config, f"stage-{number}-{name}"),
                          description=f"ASPIRE stage {number} {name}")


_STAGE_BODIES: dict[str, Callable[[], Any]] = {}  # token -> the stage's work, looked up by the stage subflow
_STAGE_RESULTS: dict[str, Any] = {}  # token -> what the work returned


@flow(name="aspire-stage", flow_run_name="{name}", log_prints=False)
def stage_flow(name: str, token: str) -> None:
    """One stage of a run as a Prefect subflow, so the run graph reads as the pipeline (one box per stage, its shard
    tasks inside) and a failing stage shows as the failed box. Its parameters are the stage's name and a token:
    rows and models never go to the Prefect API, and the flow pickles by reference for Dask workers. It returns
    nothing: Prefect walks a flow's return value object by object (9.8 s for 28k rows here), so the rows go back
    through ``_STAGE_RESULTS``.

    The stage's task runs carry only their own tags (``gpu`` where they use CUDA), not the run's labels (``aspire``,
    ``dataset:...``, ``stages:...``), which stay on the flow runs: Prefect makes two API calls per tagged task run
    (taking and giving back tag concurrency slots), and behind a server still busy with the previous stage's runs
    these held back the first caption shard of a 16x run by 2.3 s."""
    with TagsContext(current_tags=set()):
        _STAGE_RESULTS[token] = _stage_body(token)()


def _stage_body(token: str) -> Callable[[], Any]:
    # a module function (pickled by reference): Dask pickles the subflow by value with the globals its code names,
    # and the registry holds the task runner
    return _STAGE_BODIES[token]


def as_stage_flow(name: str, body: Callable[[], Any]) -> Any:
    """Run ``body()`` inside :func:`stage_flow` named ``name``."""
    token = uuid.uuid4().hex
    _STAGE_BODIES[token] = body
    try:
        stage_flow(name=name, token=token)
        return _STAGE_RESULTS[token]
    finally:
        del _STAGE_BODIES[token]
        _STAGE_RESULTS.pop(token, None)


def cached_summary(marker: dict[str, Any]) -> dict[str, Any]:
    """A committed stage's summary as a run reports it when it reuses the stage."""
    return {**marker["summary"], "status": "done", "cached": True, "seconds": 0.0}


def run_stage(config: RunConfig, name: str, store: StageStore, force: bool,
              compute: Callable[[], tuple[list[Row], dict, list[str]]]) -> tuple[list[Row], dict]:
    """Reuse a committed stage output, or compute it, commit it and publish its summary.

    ``compute()`` returns (rows, summary, parts the output depends on)."""
    logger = get_run_logger()
    if force and store.root.exists():
        logger.info("%s: --force, removing %s", name, store.root)
        shutil.rmtree(store.root)
    marker = store.stage_marker()
    if marker is not None and retry_pending(marker):
        logger.info("%s: %d rows failed in the last run and are tried again", name, retry_pending(marker))
    elif marker is not None:
        logger.info("%s: cached (%s, %d rows)", name, store.key, marker["rows"])
        summary = cached_summary(marker)
        publish(config, name, summary)
        return store.read_rows(), summary
    start = time.perf_counter()
    with store.running():  # `aspire status` from another process shows the stage as running
        rows, summary, parts = compute()
        summary = {**summary, "rows_out": len(rows), "key": store.key}
        store.commit_stage(rows, summary, parts)
    summary = {**summary, "status": "done", "cached": False, "seconds": round(time.perf_counter() - start, 3)}
    publish(config, name, summary)
    computed = (f", {summary['shards_run']} of {summary['shards']} shards computed here"
                if "shards_run" in summary and "shards" in summary else "")
    logger.info("%s: done in %.1f s (%d rows%s)", name, summary["seconds"], len(rows), computed)
    return rows, summary


# -- the stages ------------------------------------------------------------------------------------------


