"""One module per pipeline stage: the stage's pure functions, and at the bottom its Prefect task(s)."""

from prefect.utilities.annotations import quote as _prefect_quote

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


class quote(_prefect_quote):
    """Prefect's ``quote``: the task receives the value and Prefect does not walk it (a 256-row shard cost 0.4 s of
    parameter visiting, a 28k-row training call 24 s). Prefect's own loses its value's shape when cloudpickled to a
    Dask worker (``quote(([...],))``); this one pickles as the call that made it."""

    def __reduce__(self):
        return (type(self), (self.unwrap(),))
