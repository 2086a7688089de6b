"""How one reward is picked from K heads (Coste et al. 2023, arXiv 2310.02743).

`min` is worst-case optimisation (WCO), the pessimistic default that resists reward hacking;
`uwo` is uncertainty-weighted optimisation: mean - lambda * variance across heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from model_store.manifest import validate_aggregation


class HeadStats(Protocol):
    rewards: Sequence[float]
    min: float
    max: float
    mean: float
    std: float


def aggregate(stats: HeadStats, aggregation: str, uwo_lambda: float) -> float:
    """Reduce one item's heads; the reductions come from the kernel (NaN-propagating), not recomputed."""
    if aggregation == "min":
        return stats.min
    if aggregation == "max":
        return stats.max
    if aggregation == "mean":
        return stats.mean
    if aggregation == "uwo":
        return stats.mean - uwo_lambda * stats.std * stats.std
    validate_aggregation(aggregation, len(stats.rewards))
    return stats.rewards[int(aggregation[5:])]
