"""Offline preference data with a known gold reward: template reviews scored by VADER.

Why this toy: over-optimisation needs a proxy that is right on common inputs and wrong on rare ones.
Half the adjective slots draw from a short fixed list, half from a Zipf-weighted long tail of the
VADER lexicon (~6,000 words), so many words a proxy meets in a large candidate pool were rare or
unseen in its 2,000 training pairs. Gold = VADER compound of the response (in [-1, 1]).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

DOMAINS = {
    "restaurant": ["soup", "steak", "dessert", "wine list", "pasta", "bread", "salad", "curry"],
    "hotel": ["room", "bed", "breakfast", "pool", "lobby", "shower", "view", "spa"],
    "airline": ["flight", "seat", "meal", "crew", "boarding", "legroom", "lounge", "check-in"],
    "bookshop": [
        "novel",
        "poetry shelf",
        "cafe",
        "staff picks",
        "atlas",
        "children's corner",
        "cookbook",
        "map",
    ],
    "gym": ["treadmill", "yoga class", "locker room", "trainer", "sauna", "weights", "pool", "music"],
    "cinema": ["film", "popcorn", "screen", "sound", "seats", "trailer", "ending", "soundtrack"],
    "museum": [
        "exhibition",
        "gallery",
        "audio guide",
        "sculpture",
        "gift shop",
        "tour",
        "painting",
        "garden",
    ],
    "garage": ["repair", "oil change", "invoice", "mechanic", "waiting room", "tyres", "brakes", "quote"],
}
COMMON = (
    "good bad great fine awful nice poor excellent okay terrible decent slow quick clean dirty friendly "
    "rude cheap pricey average amazing boring lovely horrible pleasant bland fresh stale warm cold noisy "
    "quiet cozy cramped helpful useless perfect mediocre wonderful disappointing"
).split()
TEMPLATES = (
    "The {s} was {a} and {b}.",
    "I found the {s} {a}, though the staff were {b}.",
    "{A} {s}, {b} service, {c} overall.",
    "Honestly the {s} felt {a}; the price was {b}.",
    "A {a} visit: the {s} was {b} and the place {c}.",
    "The {s} seemed {a} at first, then {b}.",
)


def prompts() -> list[str]:
    """64 prompts: 8 domains x 8 subjects."""
    return [f"Write a short review of the {s} at the {d}." for d, subs in DOMAINS.items() for s in subs]


@lru_cache(maxsize=1)
def _analyzer():  # noqa: ANN202 - vaderSentiment.SentimentIntensityAnalyzer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@lru_cache(maxsize=1)
def long_tail() -> tuple[list[str], list[float]]:
    """Alphabetic VADER lexicon words (>= 4 letters) in a fixed shuffled order with Zipf weights."""
    words = sorted(w for w in _analyzer().lexicon if w.isalpha() and len(w) >= 4)
    random.Random(20260).shuffle(words)
    weights = [1.0 / (rank + 10) for rank in range(len(words))]
    return words, weights


def gold(texts: list[str]) -> list[float]:
    sia = _analyzer()
    return [sia.polarity_scores(t)["compound"] for t in texts]


@dataclass
class Generator:
    """Seeded response sampler: subject of the prompt + adjectives (half common, half long tail)."""

    seed: int

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.tail, self.tail_w = long_tail()
        self.subjects = [s for subs in DOMAINS.values() for s in subs]

    def _adj(self) -> str:
        r = self.rng
        w = r.choice(COMMON) if r.random() < 0.5 else r.choices(self.tail, self.tail_w)[0]
        u = r.random()
        if u < 0.1:
            return f"not {w}"
        if u < 0.2:
            return f"very {w}"
        return w

    def response(self, prompt_index: int) -> str:
        t = self.rng.choice(TEMPLATES)
        a, b, c = self._adj(), self._adj(), self._adj()
        return t.format(s=self.subjects[prompt_index], a=a, b=b, c=c, A=a[:1].upper() + a[1:])


def preference_rows(n_pairs: int, seed: int, noise: float = 0.25) -> list[dict[str, str]]:
    """{prompt, chosen, rejected} rows labelled by gold, then a `noise` share of labels flipped."""
    gen = Generator(seed)
    ps = prompts()
    rng = random.Random(seed + 7)
    rows = []
    for _ in range(n_pairs):
        i = rng.randrange(len(ps))
        x, y = gen.response(i), gen.response(i)
        gx, gy = gold([x, y])
        better = (gx > gy) if gx != gy else (rng.random() < 0.5)
        if rng.random() < noise:
            better = not better
        chosen, rejected = (x, y) if better else (y, x)
        rows.append({"prompt": ps[i], "chosen": chosen, "rejected": rejected})
    return rows


def pools(pool_size: int, seed: int, n_prompts: int = 64) -> tuple[list[str], list[list[str]]]:
    """Candidate responses per prompt for best-of-n: (prompts, responses[prompt][j]); `n_prompts` evenly
    spaced prompts (16 = two subjects per domain)."""
    gen = Generator(seed)
    ps = prompts()
    idx = [round(j * len(ps) / n_prompts) for j in range(n_prompts)]
    return [ps[i] for i in idx], [[gen.response(i) for _ in range(pool_size)] for i in idx]
