"""What the engine returns for one item; every front end (HTTP, JSONL, training) reads this."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model_store.aggregation import Aggregation
from model_store.uncertainty import DisagreementQuantiles, std_percentile

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

    @property
    def finite(self) -> bool:
        """Every head's reward and the disagreement are finite numbers: the one rule for serving it."""
        return all(math.isfinite(v) for v in (*self.rewards, self.std))


def item_result(
    s: ItemScore,
    aggregation: Aggregation,
    head_names: Sequence[str],
    quantiles: DisagreementQuantiles | None,
    *,
    heads: bool = True,
    novelty_quantiles: DisagreementQuantiles | None = None,
) -> dict[str, Any]:
    """The per-item result every front end emits (`/v1/score`'s `results`, the JSONL job's lines):
    the aggregated reward, every head's reward by name (None when not asked for), min/max/mean/std,
    tokens, truncation, and where the disagreement falls among the reference split's; for a model with
    a novelty statistic also `novelty` and its percentile (absent otherwise: outputs stay as before)."""
    out = {
        "reward": aggregation.apply(s),
        "heads": dict(zip(head_names, s.rewards, strict=True)) if heads else None,
        **s.summary(),
        "std_percentile": std_percentile(s.std, quantiles),
    }
    if s.novelty is not None:
        out["novelty_percentile"] = std_percentile(s.novelty, novelty_quantiles)
    return out
