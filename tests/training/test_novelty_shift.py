"""The shift sets of `hydra-rm experiment novelty-shift` are what their names say."""

from __future__ import annotations

import random

from training.novelty_shift import PRAISE, SHIFTS, shifted


def test_shifts() -> None:
    src = ["the soup was warm and the bread was fresh", "a calm and pleasant room"]
    rng = random.Random(0)
    salad, shuffled, praise = (shifted(src, k, rng) for k in SHIFTS)
    assert all(sorted(a.split()) == sorted(b.split()) for a, b in zip(shuffled, src, strict=True))
    assert shuffled != src
    assert all(len(s.split()) == len(r.split()) for s, r in zip(salad, src, strict=True)) and salad != src
    assert all(
        set(p.rstrip("!").split()) <= set(PRAISE) and len(set(p.rstrip("!").split())) == 2 for p in praise
    )
