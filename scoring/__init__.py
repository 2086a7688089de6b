"""The scoring engine: items in, per-head rewards out, below every front end (HTTP, jobs, CLI, training).

Imports `model_store` and `kernels` only; nothing here knows about HTTP.
"""
