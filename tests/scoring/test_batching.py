"""The pure batch planner: every item exactly once, shortest first, never over budget."""

from __future__ import annotations

import random

import pytest

from scoring.batching import padded_tokens, plan_batches


@pytest.mark.parametrize("seed", range(20))
def test_random_plans_respect_budget_and_cover_everything(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 600) for _ in range(rng.randint(0, 300))]
    budget, cap = rng.choice([512, 1024, 4096]), rng.choice([1, 8, 64])
    batches = plan_batches(lengths, budget, cap)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= cap
        lens = [lengths[i] for i in b]
        assert padded_tokens(lens) <= budget or len(b) == 1  # only a lone over-long item may exceed
    # sorted: each batch's items are no longer than the next batch's
    for a, b in zip(batches, batches[1:], strict=False):
        assert max(lengths[i] for i in a) <= min(lengths[i] for i in b)


def test_padding_is_small_after_sorting() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(10, 400) for _ in range(500)]
    batches = plan_batches(lengths, 4096, 64)
    computed = sum(padded_tokens([lengths[i] for i in b]) for b in batches)
    naive = sum(padded_tokens(lengths[i : i + 16]) for i in range(0, len(lengths), 16))
    assert computed / sum(lengths) < 1.1 < naive / sum(lengths)


def test_greedy_fills_up_to_budget() -> None:
    assert plan_batches([10] * 10, 40, 100) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert plan_batches([5, 100, 5], 50, 10) == [[0, 2], [1]]  # over-long item alone
    assert plan_batches([], 100, 10) == []
    with pytest.raises(ValueError):
        plan_batches([1], 0, 1)
