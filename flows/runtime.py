"""Where Prefect and execution choices live: environment defaults and the task runner."""

from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

from aspire.config import RunnerConfig

PROJECT_LOGGERS = ("aspire", "tasks", "flows")


def prefect_defaults() -> None:
    """Environment defaults set before Prefect is imported (a user's own settings win).

    The ephemeral SQLite API needs 12-25 s to start on a 2-core machine, close to Prefect's 20 s default
    timeout, so the timeout is raised; analytics are off because machines may be offline; the project's loggers
    are Prefect's extra loggers, so their lines reach the terminal and the Prefect UI.
    """
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")
    # the project's own loggers (epoch loss and accuracy, skips with reasons) go to the console and the run's logs
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", ",".join(PROJECT_LOGGERS))
    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))


def project_logging() -> None:
    """The project's loggers at INFO (Prefect attaches its API handler to them but leaves their level to the
    root's WARNING, which would drop the epoch lines); Prefect's flow- and task-run loggers print a run stopped
    on purpose (``StageFailed``) or by its storage (a full disk) as its one-line message, without the traceback."""
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        runs = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForStops) for f in runs.filters):
            runs.addFilter(_NoTracebackForStops())


class _NoTracebackForStops(logging.Filter):
    """Drops the traceback of a run stopped on purpose (``StageFailed``) or by its storage (disk full)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from flows.running import StageFailed, storage_error

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, StageFailed) or storage_error(error) is not None:
            record.exc_info, record.exc_text = None, None
        return True


_WATCHDOG = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is for the parent, which it outlives
parent, me, seen = int(sys.argv[1]), os.getpid(), {}

def started(pid):  # the process's start time: a pid reused by another process has another
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None

while True:
    alive = os.getppid() == parent  # once the parent dies this process is re-parented
    if alive:
        try:  # remembered, not replaced: a parent shutting down on SIGTERM may list no children at the end
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                for pid in {int(p) for p in f.read().split()} - {me} - set(seen):
                    seen[pid] = started(pid)
        except OSError:
            alive = False
    if not alive:  # stop what the parent had started and is still running
        for pid, start in seen.items():
            if start is not None and started(pid) == start:
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
        break
    time.sleep(0.5)
"""


_WATCHED = {"pid": None}


def stop_children_on_death() -> None:
    """Start a small watchdog process that, should this process die without cleaning up (SIGKILL of the CLI
    alone), terminates the processes it had started (Prefect's temporary API server would otherwise keep
    running). Linux only (it reads /proc); elsewhere a no-op."""
    import subprocess

    if _WATCHED["pid"] == os.getpid() or not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        return  # one watchdog per process (tests invoke the CLI many times in one process)
    _WATCHED["pid"] = os.getpid()
    subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_prefect() -> None:
    """Before a command's flows run: :func:`stop_children_on_death`, then Prefect's temporary API server started
    now, when no ``PREFECT_API_URL`` names a server, out of reach of the terminal's Ctrl-C.

    Ctrl-C sends SIGINT to every process of the terminal's foreground job, Prefect's server included, which
    stopped at once; the run, recording its flow runs as crashed, then retried the dead server for minutes and
    printed its tracebacks. Started with SIGINT blocked (a signal mask its process inherits and keeps), the server
    outlives the Ctrl-C, takes the crash records and is stopped by Prefect when the command exits (SIGTERM), or
    by :func:`stop_children_on_death` if the command is killed."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    stop_children_on_death()
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        SubprocessASGIServer().start()  # the instance Prefect's clients use (one per port, None: the temporary one)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def terminal_display():
    """On a terminal, log lines are written above the progress bars instead of through them (tqdm's logging
    redirection of the console handler); in a pipe or file the bars are off (``disable=None``) and lines are plain."""
    if not sys.stderr.isatty():
        return nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


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
