"""The server loads, warms up and runs its model on one thread (a second thread doing torch work
gives the process a second OpenMP pool, and libgomp then throttles every pool's spin-wait)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

import service.app
from scoring.engine import ScoringEngine
from scoring.settings import Settings, build_engine
from tests.service.conftest import live_server


def test_model_load_warm_up_and_forwards_share_one_thread(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, set[str]] = {"load": set(), "warmup": set(), "forward": set()}

    def recording_build(settings: Settings) -> ScoringEngine:
        seen["load"].add(threading.current_thread().name)
        engine = build_engine(settings)
        warmup, forward = engine.warmup, engine.forward

        def rec_warmup() -> None:
            seen["warmup"].add(threading.current_thread().name)
            warmup()

        def rec_forward(batch: Any) -> Any:
            seen["forward"].add(threading.current_thread().name)
            return forward(batch)

        engine.warmup, engine.forward = rec_warmup, rec_forward  # type: ignore[method-assign]
        return engine

    monkeypatch.setattr(service.app, "build_engine", recording_build)
    settings = Settings(model=str(tiny_llama_dir), store_root=tmp_path / "store")
    with live_server(settings) as live, live.client() as c:
        r = c.post("/get_reward", json={"query": ["a short answer", "another one"]})
        assert r.status_code == 200, r.text
    threads = seen["load"] | seen["warmup"] | seen["forward"]
    assert all(seen.values()) and len(threads) == 1, seen
    assert threads.pop().startswith("hydra-rm-forward")
