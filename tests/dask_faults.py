"""A shard task whose Dask worker process dies on its first try (tests/test_flow.py, the Dask runner's fault test).

A module of its own: Dask workers unpickle the task by reference and import it, so it must stay light."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from aspire.cache import ShardResult, StageStore


@task(name="crash-once-shard", task_run_name="crash-once-shard-{index}", cache_policy=NO_CACHE)
def crash_once_shard_task(store: StageStore, index: int, rows: list[dict], flag: str) -> dict:
    """Shard 0 kills its worker process half-way through its first try (the flag file records the dead pid)."""

    def run(shard_rows: list[dict], out: Path) -> ShardResult:
        (out / "partial.txt").write_text("half-written")
        if index == 0 and not Path(flag).exists():
            Path(flag).write_text(str(os.getpid()))
            os._exit(1)
        return ShardResult([{**row, "pid": os.getpid()} for row in shard_rows], [])

    return store.ensure_shard(index, rows, run)
