"""Where Prefect and execution choices live: environment defaults and the task runner."""

from __future__ import annotations

import os

from aspire.config import RunnerConfig


def prefect_defaults() -> None:
    """Environment defaults set before Prefect is imported (a user's own settings win).

    The ephemeral SQLite API needs 12-25 s to start on a 2-core machine, close to Prefect's 20 s default
    timeout, so the timeout is raised; analytics are off because machines may be offline.
    """
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))


def make_task_runner(config: RunnerConfig):
    """Threads on this machine, or Dask: a local cluster of worker processes, or an existing cluster."""
    if config.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=config.n_workers)
    from prefect_dask import DaskTaskRunner

    if config.address:
        return DaskTaskRunner(address=config.address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": config.n_workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})
