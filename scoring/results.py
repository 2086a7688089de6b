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

    def summary(self) -> dict[str, Any]:
        """The per-item fields every output format (HTTP, JSONL) reports beside the heads."""
        return {
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": self.std,
            "tokens": self.tokens,
            "truncated": self.truncated,
        }
