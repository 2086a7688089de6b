"""How one reward is picked from K heads (Coste et al. 2023, arXiv 2310.02743): parsed once, applied.

`min` is worst-case optimisation (WCO), the pessimistic default that resists reward hacking;
`uwo` is uncertainty-weighted optimisation: mean - lambda * variance across heads; `head:<i>` is one
head. The text form (`min`, `head:2`, ...) is parsed here and only here: by the manifest, the
settings, the CLI and each request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Kind = Literal["min", "mean", "max", "uwo", "head"]
KINDS: tuple[Kind, ...] = ("min", "mean", "max", "uwo")


class HeadStats(Protocol):
    rewards: Sequence[float]
    min: float
    max: float
    mean: float
    std: float


@dataclass(frozen=True)
class Aggregation:
    """A parsed aggregation: `kind`, the head index for `head`, and lambda (used by `uwo` only)."""

    kind: Kind
    head: int | None = None
    uwo_lambda: float = 1.0

    @classmethod
    def parse(cls, text: str, num_heads: int, uwo_lambda: float = 1.0) -> Aggregation:
        """`min|mean|max|uwo|head:<i>` for a model of `num_heads` heads; ValueError names what is wrong."""
        if text in KINDS:
            return cls(text, None, uwo_lambda)  # type: ignore[arg-type]
        if text.startswith("head:"):
            idx = text[5:]
            if idx.isascii() and idx.isdigit() and len(idx) <= 6 and int(idx) < num_heads:
                return cls("head", int(idx), uwo_lambda)
            raise ValueError(f"head index in {text[:32]!r} must be an integer in [0, {num_heads - 1}]")
        raise ValueError(f"unknown aggregation {text[:32]!r}; expected one of min, mean, max, uwo, head:<i>")

    @property
    def name(self) -> str:
        return f"head:{self.head}" if self.kind == "head" else self.kind

    def apply(self, stats: HeadStats) -> float:
        """Reduce one item's heads; the reductions come from the kernel (NaN-propagating), not recomputed."""
        if self.kind == "min":
            return stats.min
        if self.kind == "max":
            return stats.max
        if self.kind == "mean":
            return stats.mean
        if self.kind == "uwo":
            return stats.mean - self.uwo_lambda * stats.std * stats.std
        assert self.head is not None
        return stats.rewards[self.head]

    def apply_rows(self, rewards: Any) -> Any:
        """The same reduction over a [N, K] tensor of rewards (training, evaluation, the experiment);
        variance over heads is the population variance, as the kernel's std."""
        if self.kind == "min":
            return rewards.min(1).values
        if self.kind == "max":
            return rewards.max(1).values
        if self.kind == "mean":
            return rewards.mean(1)
        if self.kind == "uwo":
            return rewards.mean(1) - self.uwo_lambda * rewards.var(1, correction=0)
        return rewards[:, self.head]
