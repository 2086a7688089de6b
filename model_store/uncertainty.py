"""Head disagreement on a known scale: where an item's std falls among the reference split's stds.

Training fits per-head normalisation on a reference split and stores quantiles of the normalised
head std there (`RewardManifest.disagreement`). A raw std means little across models; its percentile
against the model's own reference says "more disagreement than 97% of what the model was fitted on",
the drift signal an RL run can watch. Pure functions only: the service wires them in.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The probabilities written at training time: dense in the upper tail, where drift shows.
DEFAULT_PROBS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.975, 0.99, 0.999, 1.0)


class DisagreementQuantiles(BaseModel):
    """Quantiles of the per-item head std (normalised heads) on the reference split."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    probs: list[float] = Field(description="increasing probabilities in [0, 1]")
    values: list[float] = Field(description="the std at each probability (non-decreasing)")
    n: int = Field(ge=1, description="reference items the quantiles were computed on")

    @model_validator(mode="after")
    def _monotone(self) -> DisagreementQuantiles:
        if len(self.probs) != len(self.values) or len(self.probs) < 2:
            raise ValueError("disagreement.probs and .values must have the same length (>= 2)")
        if any(not 0.0 <= p <= 1.0 for p in self.probs) or any(
            b <= a for a, b in zip(self.probs, self.probs[1:], strict=False)
        ):
            raise ValueError("disagreement.probs must be strictly increasing within [0, 1]")
        if any(b < a for a, b in zip(self.values, self.values[1:], strict=False)):
            raise ValueError("disagreement.values must be non-decreasing")
        return self

    def percentile(self, std: float) -> float:
        return std_percentile(std, self)

    @property
    def p95(self) -> float | None:
        """The reference p95 (the dashboard's drift threshold), when it was stored."""
        return dict(zip(self.probs, self.values, strict=True)).get(0.95)

    @property
    def median(self) -> float | None:
        """The reference median (the unit of `stdp`'s beta), when it was stored."""
        return dict(zip(self.probs, self.values, strict=True)).get(0.5)


def fit_quantiles(stds: Sequence[float], probs: Sequence[float] = DEFAULT_PROBS) -> DisagreementQuantiles:
    """Empirical quantiles (linear interpolation, numpy's default) of reference stds."""
    xs = sorted(float(s) for s in stds)
    if not xs:
        raise ValueError("cannot fit disagreement quantiles on an empty reference split")
    values = []
    for p in probs:
        pos = p * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        values.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return DisagreementQuantiles(probs=list(probs), values=values, n=len(xs))


def std_percentile(std: float, quantiles: DisagreementQuantiles | None) -> float | None:
    """Percentile (0-100) of `std` among the reference stds, interpolated between stored quantiles.

    None when the model has no stored quantiles (or the std is not finite), so callers can report
    `null` instead of a made-up number. Below the lowest stored value -> the lowest probability; above
    the highest -> the highest (100 when the maximum was stored). Ties (flat runs of equal values)
    take the highest probability of the run: an item exactly at the reference p95 is at >= 95.
    """
    if quantiles is None or not math.isfinite(std):
        return None
    ps, vs = quantiles.probs, quantiles.values
    if std < vs[0]:
        return 100.0 * ps[0]
    if std >= vs[-1]:
        return 100.0 * ps[-1]
    i = bisect.bisect_right(vs, std)  # vs[i-1] <= std < vs[i]
    lo_v, hi_v, lo_p, hi_p = vs[i - 1], vs[i], ps[i - 1], ps[i]
    frac = (std - lo_v) / (hi_v - lo_v)
    return 100.0 * (lo_p + frac * (hi_p - lo_p))


# The novelty statistic's description lives here, beside the std's quantiles, so the manifest reads
# it without importing torch (model_store/novelty.py holds the math and the tensors).
NOVELTY_FILE = "novelty.safetensors"


class NoveltyInfo(BaseModel):
    """The manifest's description of `novelty.safetensors` and its reference quantiles."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    file: str = Field(default=NOVELTY_FILE, description="safetensors file with `basis` and `coef`")
    hidden_size: int = Field(ge=1)
    rank: int = Field(ge=1)
    lam: float = Field(gt=0.0)
    resid: float = Field(ge=0.0)
    n: int = Field(ge=1, description="reference rows the matrix was fitted on")
    feature: str = Field(description="pooling kind of phi (the row the heads read)")
    quantiles: DisagreementQuantiles = Field(description="u on the held-out reference split")
    reward_std: float = Field(gt=0.0, description="std of the mean-over-heads reward on that split")

    @model_validator(mode="after")
    def _shape(self) -> NoveltyInfo:
        if self.rank > self.hidden_size:
            raise ValueError("novelty.rank cannot exceed novelty.hidden_size")
        if self.file != NOVELTY_FILE:
            raise ValueError(f"novelty.file must be {NOVELTY_FILE!r}")
        if self.median <= 0:
            raise ValueError("novelty.quantiles must have a positive median (p = 0.5)")
        return self

    @property
    def median(self) -> float:
        """u at the reference median: the unit of `lcb`'s beta."""
        return float(dict(zip(self.quantiles.probs, self.quantiles.values, strict=True)).get(0.5, 0.0))
