"""How one reward is picked from K heads (Coste et al. 2023, arXiv 2310.02743): parsed once, applied.

`min` is worst-case optimisation (WCO), the pessimistic default that resists reward hacking;
`uwo` is uncertainty-weighted optimisation: mean - lambda * variance across heads; `lcb` is
mean - beta * reward_std * u / u_median, pessimism by feature-space novelty u in reference units
(model_store/novelty.py; only for models with the statistic); `stdp` is
mean - beta * reward_std * std / std_median, pessimism by head disagreement in reference units
(issue 17: heads that agree to ~0.01 reward units leave `min` nothing to bite on, while their std
relative to the reference split still ranks gaming inputs; docs/experiments/overopt-pretrained.md);
`head:<i>` is one head. The text form (`min`, `head:2`, ...) is parsed here and only here: by the
manifest, the settings, the CLI and each request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

Kind = Literal["min", "mean", "max", "uwo", "lcb", "stdp", "head"]
KINDS: tuple[Kind, ...] = ("min", "mean", "max", "uwo", "lcb", "stdp")
# `stdp`'s reward scale when the model carries no novelty statistic (whose reward_std it reads):
# normalised heads have unit std on the reference split, and the mean of K of them has std
# sqrt((1 + (K-1) corr) / K), 1 for heads that agree (0.98-0.99 measured on MiniLM's K=3 heads).
UNIT_REWARD_STD = 1.0


class NoveltyScale(Protocol):
    """What `lcb` reads of a model's novelty statistic (model_store.novelty.NoveltyInfo)."""

    @property
    def reward_std(self) -> float: ...

    @property
    def median(self) -> float: ...


class StdScale(Protocol):
    """What `stdp` reads of a model's disagreement quantiles (model_store.uncertainty)."""

    @property
    def median(self) -> float | None: ...


class HeadStats(Protocol):
    rewards: Sequence[float]
    min: float
    max: float
    mean: float
    std: float
    novelty: float | None


@dataclass(frozen=True)
class Aggregation:
    """A parsed aggregation: `kind`, the head index for `head`, lambda (`uwo` only), beta (`lcb` /
    `stdp` only) and the model's scales `lcb_scale` = reward_std / u_median and `stdp_scale` =
    reward_std / std_median (set by `bind`; `lcb` and `stdp` need them)."""

    kind: Kind
    head: int | None = None
    uwo_lambda: float = 1.0
    lcb_beta: float = 1.0
    lcb_scale: float | None = None
    stdp_beta: float = 1.0
    stdp_scale: float | None = None

    @classmethod
    def parse(
        cls, text: str, num_heads: int, uwo_lambda: float = 1.0, lcb_beta: float = 1.0, stdp_beta: float = 1.0
    ) -> Aggregation:
        """`min|mean|max|uwo|lcb|stdp|head:<i>` for a model of `num_heads` heads; ValueError names what is
        wrong."""
        if text in KINDS:
            return cls(text, None, uwo_lambda, lcb_beta, stdp_beta=stdp_beta)  # type: ignore[arg-type]
        if text.startswith("head:"):
            idx = text[5:]
            if idx.isascii() and idx.isdigit() and len(idx) <= 6 and int(idx) < num_heads:
                return cls("head", int(idx), uwo_lambda, lcb_beta, stdp_beta=stdp_beta)
            raise ValueError(f"head index in {text[:32]!r} must be an integer in [0, {num_heads - 1}]")
        raise ValueError(
            f"unknown aggregation {text[:32]!r}; expected one of min, mean, max, uwo, lcb, stdp, head:<i>"
        )

    def bind(self, novelty: NoveltyScale | None, disagreement: StdScale | None) -> Aggregation:
        """Bind `lcb` / `stdp` to a model's reference units; ValueError when it lacks what they read."""
        return self.for_novelty(novelty).for_disagreement(disagreement, novelty)

    def for_disagreement(self, quantiles: StdScale | None, novelty: NoveltyScale | None) -> Aggregation:
        """Bind `stdp` to the model's reference median of the head std (and reward_std, from the novelty
        statistic when it has one: UNIT_REWARD_STD otherwise)."""
        if self.kind != "stdp":
            return self
        median = quantiles.median if quantiles is not None else None
        if median is None or not median > 0:
            raise ValueError(
                "`stdp` needs the reference quantiles of the head std (manifest `disagreement`, written by "
                "`hydra-rm train` for K >= 2 heads) and this model has none"
            )
        reward_std = novelty.reward_std if novelty is not None else UNIT_REWARD_STD
        return replace(self, stdp_scale=reward_std / median)

    def for_novelty(self, info: NoveltyScale | None) -> Aggregation:
        """Bind `lcb` to a model's reference units; ValueError when the model has no statistic."""
        if self.kind != "lcb":
            return self
        if info is None:
            raise ValueError(
                "`lcb` needs a novelty statistic and this model has none (write one with `hydra-rm calibrate`)"
            )
        return replace(self, lcb_scale=info.reward_std / info.median)

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
        if self.kind == "lcb":
            if stats.novelty is None or self.lcb_scale is None:  # for_novelty refused such models upfront
                raise ValueError("`lcb` applied without a novelty statistic")
            return stats.mean - self.lcb_beta * self.lcb_scale * stats.novelty
        if self.kind == "stdp":
            if self.stdp_scale is None:  # for_disagreement refused such models upfront
                raise ValueError("`stdp` applied without the model's reference std")
            return stats.mean - self.stdp_beta * self.stdp_scale * stats.std
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
        if self.kind == "lcb":  # needs each row's novelty, which a reward matrix does not carry
            raise ValueError("`lcb` cannot be applied to a reward matrix alone")
        if self.kind == "stdp":
            if self.stdp_scale is None:
                raise ValueError("`stdp` applied without the model's reference std")
            return rewards.mean(1) - self.stdp_beta * self.stdp_scale * rewards.std(1, correction=0)
        return rewards[:, self.head]
