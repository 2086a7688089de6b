"""The batch-forming step as a pure function, so it can be tested apart from any event loop.

Measured on this CPU (DESIGN.md): compute is nearly linear in *padded* tokens, so sorting by length
and capping padded tokens per batch is what pays; huge budgets lose to cache effects.
"""

from __future__ import annotations

from collections.abc import Sequence


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens the encoder actually computes for a batch padded to its longest row."""
    return max(lengths, default=0) * len(lengths)


def plan_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int) -> list[list[int]]:
    """Group item indices into batches, shortest first, each within `token_budget` padded tokens.

    An item longer than the whole budget still gets a batch of its own (it cannot be split); every
    other batch satisfies `max(len) * n <= token_budget` and `n <= max_batch_size`. Each index
    appears exactly once.
    """
    if token_budget < 1 or max_batch_size < 1:
        raise ValueError("token_budget and max_batch_size must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = max(lengths[i], 1)
        new_longest = max(longest, n)
        if current and (new_longest * (len(current) + 1) > token_budget or len(current) >= max_batch_size):
            batches.append(current)
            current, new_longest = [], n
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches
