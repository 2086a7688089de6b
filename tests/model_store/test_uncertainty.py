"""std_percentile: where an item's head std falls among the reference split's stds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model_store.manifest import RewardManifest
from model_store.uncertainty import DisagreementQuantiles, fit_quantiles, std_percentile


def test_fit_quantiles_match_numpy():
    xs = np.random.default_rng(0).gamma(2.0, 0.3, size=1001)
    q = fit_quantiles(xs.tolist())
    np.testing.assert_allclose(q.values, np.quantile(xs, q.probs), rtol=1e-12)
    assert q.n == 1001 and q.p95 == pytest.approx(float(np.quantile(xs, 0.95)))


def test_std_percentile_hand_values():
    q = DisagreementQuantiles(probs=[0.0, 0.5, 0.95, 1.0], values=[0.0, 1.0, 2.0, 4.0], n=10)
    assert std_percentile(0.5, q) == pytest.approx(25.0)
    assert std_percentile(1.5, q) == pytest.approx(72.5)
    assert std_percentile(2.0, q) == pytest.approx(95.0)  # at the reference p95 -> 95
    assert std_percentile(3.0, q) == pytest.approx(97.5)
    assert std_percentile(9.0, q) == 100.0
    assert std_percentile(-1.0, q) == 0.0
    assert std_percentile(1.0, None) is None
    assert std_percentile(math.nan, q) is None


def test_percentile_of_reference_items_is_close_to_their_rank():
    xs = np.random.default_rng(1).lognormal(size=5000)
    q = fit_quantiles(xs.tolist())
    ranks = 100.0 * (np.argsort(np.argsort(xs)) / (len(xs) - 1))
    got = np.array([std_percentile(float(x), q) for x in xs])
    err = np.abs(got - ranks)  # interpolating linearly between 13 stored quantiles of a skewed law
    assert err.max() < 4.0 and err.mean() < 1.5
    assert np.all(np.diff(got[np.argsort(xs)]) >= 0)  # monotone in the std


def test_quantiles_validate_and_live_in_the_manifest():
    with pytest.raises(ValueError, match="non-decreasing"):
        DisagreementQuantiles(probs=[0.1, 0.9], values=[2.0, 1.0], n=3)
    with pytest.raises(ValueError, match="strictly increasing"):
        DisagreementQuantiles(probs=[0.9, 0.1], values=[1.0, 2.0], n=3)
    m = RewardManifest.default_for(2, disagreement=fit_quantiles([0.1, 0.2, 0.3]), provenance={"seed": 1})
    again = RewardManifest.model_validate_json(m.model_dump_json())
    assert again.disagreement == m.disagreement and again.provenance == {"seed": 1}
    assert RewardManifest.default_for(2).disagreement is None  # models without: percentile is null
