"""The torch engine implements the engine interface every consumer types against (scoring/interface.py)."""

from __future__ import annotations

import json

from model_store.tokenization import Item
from scoring.engine import ScoringEngine
from scoring.interface import Engine


def test_torch_engine_is_an_engine_and_keeps_its_contract(tiny_engine: ScoringEngine) -> None:
    assert isinstance(tiny_engine, Engine)
    info = tiny_engine.describe()
    for key in ("name", "version", "num_heads", "head_names", "max_length", "truncation_side", "device"):
        assert key in info, key
    assert (info["name"], info["version"]) == (tiny_engine.name, tiny_engine.version)
    assert (
        info["head_names"] == tiny_engine.head_names and len(tiny_engine.head_names) == tiny_engine.num_heads
    )
    ident = json.loads(json.dumps(tiny_engine.fingerprint(), default=str))
    assert ident["name"] == tiny_engine.name and ident["max_length"] == tiny_engine.max_length

    items = [
        Item(text="a short one"),
        Item(prompt="q?", response="a longer answer " * 5),
        Item(text="mid size"),
    ]
    encoded = [tiny_engine.encode(it) for it in items]
    by_score = tiny_engine.score(items)  # planned, sorted into batches, put back in input order
    reversed_batch = tiny_engine.forward(encoded[::-1])  # one batch: results in batch order
    for s, r in zip(by_score, reversed_batch[::-1], strict=True):
        assert len(s.rewards) == tiny_engine.num_heads
        assert max(abs(a - b) for a, b in zip(s.rewards, r.rewards, strict=True)) < 1e-5
        assert s.tokens == r.tokens


def test_both_engines_score_through_the_one_base() -> None:
    """encode / score / warmup / head facts are written once (scoring/base.py): each engine brings only
    its forward, so the torch and vLLM engines cannot drift apart in how they plan and order."""
    from scoring.base import PlannedEngine
    from scoring.vllm_engine import VllmEngine  # imports without vLLM (it runs in its own venv)

    shared = ("encode", "score_encoded", "score", "warmup", "num_heads", "head_names")
    for engine in (ScoringEngine, VllmEngine):
        assert issubclass(engine, PlannedEngine)
        assert "forward" in vars(engine), engine
        for name in shared:
            assert getattr(engine, name) is getattr(PlannedEngine, name), (engine, name)
