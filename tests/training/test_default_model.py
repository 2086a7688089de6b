"""The shipped default: trained review-sentiment heads whose README numbers come from its manifest."""

from __future__ import annotations

from model_store import ModelStore
from model_store.default_model import DEFAULT_NAME, DEFAULT_VERSION, HEAD_NAMES, ensure_default_model
from training.scoring import EngineScorer


def test_default_heads_are_trained_sentiment_heads(tmp_path):
    store = ModelStore(tmp_path / "store")
    ref = ensure_default_model(store)
    assert (ref.name, ref.version) == (DEFAULT_NAME, DEFAULT_VERSION)
    scorer = EngineScorer(f"{DEFAULT_NAME}:{DEFAULT_VERSION}", store)
    assert scorer.head_names == HEAD_NAMES
    prompt = "Write a short review of the soup at the restaurant."
    good = [
        "The soup was wonderful and lovely.",
        "I found the soup excellent, though the staff were friendly.",
    ]
    bad = ["The soup was awful and horrible.", "I found the soup terrible, though the staff were rude."]
    r = scorer.score([{"prompt": prompt, "response": t} for t in good + bad])
    assert (r[:2] > r[2:]).all()  # every head prefers both positive reviews
    m = scorer.rm.manifest
    acc = m.provenance["metrics"]["test_accuracy_per_head"]
    assert min(acc.values()) >= 0.72 and m.provenance["args"]["diversity"] == "shard"
    assert m.disagreement is not None and m.disagreement.p95 is not None


def test_default_carries_the_novelty_statistic_fitted_on_its_own_data(tmp_path):
    """The shipped statistic is the recipe's (training.default_build.add_novelty): refitting it from the
    same data on the shipped weights gives the same quantiles, and word salad is more novel than a review
    of the kind it was trained on."""
    import torch

    from model_store.novelty import DEFAULT_LAMBDA
    from model_store.tokenization import Item
    from training.calibrate import engine_for, fit_for_engine
    from training.data import parse_pair, response_items
    from training.default_build import REF_SEED, TRAIN_SEED
    from training.toydata import preference_rows

    store = ModelStore(tmp_path / "store")
    ensure_default_model(store)
    scorer = EngineScorer(f"{DEFAULT_NAME}:{DEFAULT_VERSION}", store)
    info = scorer.rm.manifest.novelty
    assert scorer.rm.novelty is not None and info is not None and info.lam == DEFAULT_LAMBDA
    assert info.n == 8000 and info.quantiles.n == 800
    train = [parse_pair(r, "t") for r in preference_rows(4000, TRAIN_SEED, noise=0.1)]
    ref = [parse_pair(r, "r") for r in preference_rows(400, REF_SEED, noise=0.1)]
    engine = engine_for(scorer.rm)
    _, refit = fit_for_engine(engine, response_items(train), response_items(ref), DEFAULT_LAMBDA)
    torch.testing.assert_close(torch.tensor(refit.quantiles.values), torch.tensor(info.quantiles.values), rtol=1e-4, atol=1e-6)  # fmt: skip
    review, salad = engine.score([Item(prompt="Review the soup.", response="The soup was lovely and warm."),
                                  Item(prompt="Review the soup.", response="zx qv pelican tram ! ! seventeen")])  # fmt: skip
    assert salad.novelty > review.novelty
