"""What the engine returns for one item; every front end (HTTP, JSONL, training) reads this."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# What a front end says of an item whose row came back NaN or inf (a broken row, bad weights): the
# service fails that item's request (500), the JSONL job writes the line to its errors file. JSON
# has no NaN, and `min` would hide one head's NaN behind the others' finite values.
NON_FINITE = "the model produced a non-finite reward"


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

    @property
    def finite(self) -> bool:
        """Every head's reward and the disagreement are finite numbers: the one rule for serving it."""
        return all(math.isfinite(v) for v in (*self.rewards, self.std))
