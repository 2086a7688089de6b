"""Client tests run against real hydra-rm servers (tests/service/conftest.py's live uvicorn)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from model_store.aggregation import Aggregation
from model_store.tokenization import Item
from scoring.settings import Settings
from tests.service.conftest import Live, live_server

SPLIT_LIMIT = 16  # the module server's max_items_per_request: the client must discover and obey it


def texts(n: int, tag: str = "t") -> list[str]:
    """Distinct items of varied length, so a result at the wrong index cannot match by accident."""
    words = "the quick brown fox jumps over a lazy dog while reward heads disagree about it".split()
    return [f"{tag}{i}: " + " ".join(words[: 1 + (i * 7) % len(words)]) for i in range(n)]


def reference(engine: Any, items: Sequence[Any], aggregation: str = "min") -> list[dict[str, Any]]:
    """What the in-process engine says for the same items (the client must agree to 1e-5)."""
    agg = Aggregation.parse(aggregation, engine.num_heads, engine.manifest.uwo_lambda)
    out = []
    for s in engine.score([Item(text=it) if isinstance(it, str) else Item(**it) for it in items]):
        out.append({"reward": agg.apply(s), "heads": list(s.rewards)})
    return out


def assert_matches(results: Sequence[Any], expected: Sequence[dict[str, Any]], tol: float = 1e-5) -> None:
    assert len(results) == len(expected)
    for i, (r, e) in enumerate(zip(results, expected, strict=True)):
        assert r is not None, f"result {i} is None"
        assert abs(r.reward - e["reward"]) <= tol, (i, r.reward, e["reward"])
        assert max(abs(a - b) for a, b in zip(r.heads.values(), e["heads"], strict=True)) <= tol, i


def live_on_port(port: int, settings: Settings, engine: Any) -> Any:
    """tests/service/conftest.py's live_server, on a given port (a replica coming back where it was)."""
    return live_server(settings, engine, port=port)


@pytest.fixture(scope="module")
def server(tiny_engine: Any) -> Iterator[Live]:
    with live_server(Settings(max_items_per_request=SPLIT_LIMIT), tiny_engine) as live:
        yield live


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
