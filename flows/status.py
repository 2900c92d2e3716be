"""``aspire status``: what is committed for a config, computed from markers without running anything."""

from __future__ import annotations

from aspire.cache import StageStore, retry_pending
from aspire.config import RunConfig


def _describe(name: str, store: StageStore) -> dict:
    marker = store.stage_marker()
    if marker is not None and retry_pending(marker):
        return {"stage": name, "status": f"retry ({retry_pending(marker)} failed)", "rows": marker["rows"], "key": store.key}
    if marker is not None:
        return {"stage": name, "status": "done", "rows": marker["rows"], "key": store.key}
    committed = [p for p in sorted(store.root.glob("shard-*")) if store.read_marker(p.name) is not None]
    if store.is_running():
        status = f"running ({len(committed)} shards committed)"
    elif committed:
        status = f"partial ({len(committed)} shards)"
    elif any(p.is_dir() and p.name != store.key for p in store.root.parent.glob("*")):
        status = "stale (config changed)"
    else:
        status = "missing"
    return {"stage": name, "status": status, "rows": None, "key": store.key}


def stage_status(config: RunConfig) -> list[dict]:
    """One line per stage: ``{"stage", "status", "rows", "key"}`` with status done / retry (n failed: committed,
    the next run asks again) / running (a live run computes it now; n shards committed) / partial (n shards) /
    stale (outputs exist only for another config or input) / missing / waiting (upstream not committed)."""
    from flows.keys import STAGES, chain
    from tasks.ingest import list_dataset

    if config.synth is not None and not (config.dataset.root / ".synth-digest").is_file():
        return [{"stage": name, "status": "missing (benchmark not drawn yet)", "rows": None, "key": "-"}
                for name in STAGES]
    lines = []
    walk = chain(config, list_dataset(config))
    while True:
        try:
            name, store = next(walk)
        except StopIteration:
            break
        except (ValueError, OSError) as exc:  # a stage's key needs a model file that is not here (LAMA_MODEL unset)
            name = STAGES[len(lines)]
            lines.append({"stage": name, "status": f"unknown ({str(exc).splitlines()[0]})", "rows": None, "key": "-"})
            break
        lines.append(_describe(name, store))
    lines += [{"stage": name, "status": "waiting (upstream not done)", "rows": None, "key": "-"}
              for name in STAGES[len(lines):]]
    return lines
