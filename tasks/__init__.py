"""One module per pipeline stage: the stage's pure functions, and at the bottom its Prefect task(s)."""
