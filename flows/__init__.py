"""Prefect flows (composition only) and the ``aspire`` command line."""
