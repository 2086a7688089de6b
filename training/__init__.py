"""Multi-head Bradley-Terry training, evaluation and the over-optimisation experiment.

Stands on `model_store`, `kernels` and `scoring` (evaluation scores through the engine); never on
`service`, `jobs` or `cli`. `cli.main` imports this package lazily, inside its commands.
"""
