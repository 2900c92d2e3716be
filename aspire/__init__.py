"""Core of the ASPIRE pipeline: Prefect-free building blocks (config, manifest, cache, data, models)."""
