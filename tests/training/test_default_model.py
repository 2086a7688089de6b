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
