"""Shifted responses: inputs unlike the training reviews, by kind. The one generator both experiments use
(`hydra-rm experiment overopt-pretrained` / `heads-pretrained` and `hydra-rm experiment novelty-shift`).

Each kind is what a reward model meets off its training distribution; "praise" is the degenerate
repetitive text a policy finds when it games a sentiment-like reward. All seeded, all offline.
- domain: well-formed reviews of things no training prompt mentions, in other sentence shapes;
- salad: random words (sentiment lexicon, common adjectives, nouns) with no syntax;
- shuffled: a held-out response with its words in random order (same bag of words, no syntax);
- praise: a subject followed by repeated superlatives and exclamation marks.
"""

from __future__ import annotations

import random

from training.toydata import COMMON, DOMAINS, long_tail

KINDS = ("domain", "salad", "shuffled", "praise")
# How the tables name them (issue 21's columns).
LABELS = {
    "domain": "other domain",
    "salad": "word salad",
    "shuffled": "shuffled words",
    "praise": "repeated praise",
}
OTHER_SUBJECTS = (
    "laptop battery", "phone case", "printer driver", "wifi router", "parking app", "tax software",
    "bike lock", "coffee grinder", "train timetable", "insurance claim", "dentist visit", "phone plan",
    "keyboard", "electric kettle", "streaming service", "moving company",
)  # fmt: skip
OTHER_TEMPLATES = (
    "Bought the {s} last month: {a} setup, {b} after a week.",
    "My {s} is {a}. Support? {b}.",
    "Three stars for the {s}; {a} design but {b} in daily use.",
    "If you need a {s}, this one is {a} and frankly {b}.",
    "Update: the {s} went from {a} to {b} after the firmware change.",
)
PRAISE = ("great", "amazing", "perfect", "excellent", "wonderful", "best", "fantastic", "superb", "love")


def _word(rng: random.Random) -> str:
    tail, w = long_tail()
    return rng.choice(COMMON) if rng.random() < 0.5 else rng.choices(tail, w)[0]


def shifted(kind: str, n: int, seed: int, heldout: list[str] | None = None) -> list[str]:
    """n texts of one kind; `shuffled` permutes the words of `heldout` responses (cycled)."""
    rng = random.Random(f"{kind}:{seed}")
    subjects = [s for subs in DOMAINS.values() for s in subs]
    out = []
    for i in range(n):
        if kind == "domain":
            t = rng.choice(OTHER_TEMPLATES)
            out.append(t.format(s=rng.choice(OTHER_SUBJECTS), a=_word(rng), b=_word(rng)))
        elif kind == "salad":
            words = [
                _word(rng) if rng.random() < 0.7 else rng.choice(subjects) for _ in range(rng.randint(5, 14))
            ]
            out.append(" ".join(words))
        elif kind == "shuffled":
            if not heldout:
                raise ValueError("shuffled needs held-out responses to permute")
            words = heldout[i % len(heldout)].split()
            rng.shuffle(words)
            out.append(" ".join(words))
        elif kind == "praise":
            words = [rng.choice(PRAISE) for _ in range(rng.randint(2, 5))]
            reps = rng.randint(2, 4)
            body = " ".join(w for w in words for _ in range(reps))
            out.append(f"{rng.choice(subjects).capitalize()} {body}{'!' * rng.randint(1, 4)}")
        else:
            raise ValueError(f"unknown shift kind {kind!r}; expected one of {', '.join(KINDS)}")
    return out
