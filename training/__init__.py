"""Multi-head Bradley-Terry training, evaluation and the over-optimisation experiment.

Imports `model_store` and `kernels` (and the engine's tokenization, via `training.tokens`), never
the HTTP layer; `cli.main` imports this package lazily, inside its commands.
"""
