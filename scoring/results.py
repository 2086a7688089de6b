"""What the engine returns for one item; every front end (HTTP, JSONL, training) reads this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ItemScore:
    rewards: list[float]
    min: float
    max: float
    mean: float
    std: float
    tokens: int
    truncated: bool
    novelty: float | None = None  # feature-space novelty u (model_store/novelty.py); None: no statistic

    def summary(self) -> dict[str, Any]:
        """The per-item fields every output format (HTTP, JSONL) reports beside the heads; `novelty`
        only where the model has the statistic, so other models' outputs are exactly as before."""
        out = {
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": self.std,
            "tokens": self.tokens,
            "truncated": self.truncated,
        }
        if self.novelty is not None:
            out["novelty"] = self.novelty
        return out
