"""The ASPIRE flow: the stages of :mod:`flows.stages` composed in order, each a cached, sharded Prefect stage.

ingest -> classifier -> holdout -> caption -> extract -> remove -> background -> collapse -> personalize ->
generate -> export -> retrain. Keys (:mod:`flows.keys`) chain by content, so reruns skip committed work;
:mod:`flows.running` reuses or computes each stage and publishes its summary.
"""

from __future__ import annotations

import gc
import shutil
import uuid
from pathlib import Path

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from aspire.cache import StageStore, file_lock, retry_pending
from aspire.config import RunConfig, load_config
from aspire.manifest import Row, digest
from aspire.report import inline_figures, render_markdown, write_report
from aspire.synth import draw_background_bank, draw_benchmark
from flows.keys import STAGES, chain
from flows.preflight import preflight
from flows.running import artifact_key, as_stage_flow, cached_summary, run_stage
from flows.runtime import make_task_runner, project_logging
from flows.stages import COMPUTE
from tasks import ingest


def run_name() -> str:
    """The flow run's name in the UI: config file, workdir and the last stage run, e.g. ``demo -> data/runs/demo``."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    name = Path(params["config_path"]).stem
    try:
        name += f" -> {load_config(params['config_path'], params.get('overrides')).workdir}"
    except ValueError:  # a bad config fails in the flow itself, with its message
        pass
    until = params.get("until", STAGES[-1])
    return name if until == STAGES[-1] else f"{name} (until {until})"


@flow(name="aspire", flow_run_name=run_name)
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
    project_logging()
    force = set(force or [])
    config = load_config(config_path, overrides)
    listing = preflight(config, until)  # a scheduled run has no CLI in front of it: the same checks, before any work
    publish_config(config)
    if config.synth is not None:  # drawn now, then listed
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
                    summaries[name] = cached_summary(marker)
                continue
            rows, summaries[name] = as_stage_flow(name, lambda: run_stage(
                config, name, store, name in force, lambda: COMPUTE[name](config, runner, store, rows, stores)))
            # The rows live on: keep the cyclic garbage collector from rescanning them in every full pass (0.4 s
            # each at 16x the demo, growing with the data). Frozen objects are still freed by reference counting.
            gc.freeze()
            if name == "generate":  # held-out originals, edits and generated images: the report's grid
                edit_rows = rows
    report = write_report(config.workdir, summaries, edit_rows)
    create_markdown_artifact(render_markdown(report, inline_figures(config.workdir)), key=artifact_key(config, "report"),
                             description="ASPIRE run report")
    return report


def committed_report(config: RunConfig, until: str = STAGES[-1], listing: list[Row] | None = None) -> dict | None:
    """The run's report rebuilt from the stage markers when every stage up to ``until`` is committed for this config
    (none with failures left to retry), else None: a warm rerun decided without Prefect or any model.

    ``listing``: the dataset as :func:`tasks.ingest.list_dataset` lists it, when the caller has it already.
    Writes report.json / report.md / quarantine.csv as a run would."""
    if config.synth is not None and not (config.dataset.root / ".synth-digest").is_file():
        return None
    summaries: dict[str, dict] = {}
    edit_rows = None
    for name, store in chain(config, listing if listing is not None else ingest.list_dataset(config)):
        marker = store.stage_marker()
        if marker is None or retry_pending(marker):
            if STAGES.index(name) <= STAGES.index(until):
                return None
            continue
        summaries[name] = cached_summary(marker)
        if name == "generate":
            edit_rows = store.read_rows()
    return write_report(config.workdir, summaries, edit_rows)


def publish_config(config: RunConfig) -> None:
    """The resolved config (after overrides and defaults) as a markdown artifact."""
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    create_markdown_artifact(f"# Resolved config\n\n```yaml\n{text}```\n", key=artifact_key(config, "config"),
                             description="The run's config after overrides and defaults")


def ensure_benchmark(config: RunConfig) -> None:
    """Draw the synthetic benchmark into ``dataset.root`` unless the same draw is already there."""
    root = config.dataset.root
    stamp = root / ".synth-digest"
    wanted = digest(config.synth)
    root.parent.mkdir(parents=True, exist_ok=True)
    # two runs drawing the same benchmark: the second waits, then finds it drawn (no rmtree under a reader)
    with file_lock(root.with_name(f".{root.name}.lock")):
        if stamp.is_file() and stamp.read_text() == wanted:
            return
        get_run_logger().info("drawing the synthetic benchmark into %s", root)
        for stale in root.parent.glob(f"{root.name}.tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root.with_name(f"{root.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            draw_benchmark(config.synth, tmp)
            draw_background_bank(config.synth, tmp / "backgrounds")  # for the composite background editor
            (tmp / ".synth-digest").write_text(wanted)
        except BaseException:  # e.g. the disk is full: no half-drawn benchmark is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
