"""``aspire status``: what is committed for a config, computed from markers without running anything."""

from __future__ import annotations

from aspire.cache import StageStore
from aspire.config import RunConfig


def _describe(store: StageStore) -> dict:
    marker = store.stage_marker()
    if marker is not None:
        return {"stage": store.stage, "status": "done", "rows": marker["rows"], "key": store.key}
    committed = [p for p in sorted(store.root.glob("shard-*")) if store.read_marker(p.name) is not None]
    if committed:
        status = f"partial ({len(committed)} shards)"
    elif any(p.is_dir() and p.name != store.key for p in store.root.parent.glob("*")):
        status = "stale (config changed)"
    else:
        status = "missing"
    return {"stage": store.stage, "status": status, "rows": None, "key": store.key}


def stage_status(config: RunConfig) -> list[dict]:
    """One line per stage store: ``{"stage", "status", "rows", "key"}`` with status done / partial (n shards) /
    stale (outputs exist only for another config) / missing."""
    from flows.aspire import plan_run

    if config.synth is not None and not (config.dataset.root / ".synth-digest").is_file():
        return [{"stage": "benchmark", "status": "missing (drawn by the first run)", "rows": None, "key": "-"}]
    return [_describe(store) for store in plan_run(config).stores.values()]
