"""One module per pipeline stage: the stage's pure functions, and at the bottom its Prefect task(s)."""

TRANSIENT_ERRORS = (RuntimeError, MemoryError, ConnectionError, TimeoutError)  # CUDA OOM is a RuntimeError


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn`` of the shard tasks: retry what a second try may fix (out of memory, a dropped
    connection, a timeout), never a mistake in the input (a missing file or model, a bad value), which would only
    fail again and double the wait."""
    try:
        state.result()
    except TRANSIENT_ERRORS:
        return True
    except Exception:
        return False
    return True
