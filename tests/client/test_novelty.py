"""The client, TRL and veRL adapters carry novelty from a server whose model has the statistic."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from statistics import fmean
from typing import Any

import pytest

from client import HydraClient, verl
from client.trl import HydraReward
from model_store.tokenization import Item
from scoring.settings import Settings
from tests.service.conftest import Live, live_server

PROMPTS = ["Hi", "How was the soup?", "Tell me a story"]
ANSWERS = ["Hello there", "great great great great great great", "Once upon a time a cat sat."]


@pytest.fixture(scope="module")
def novelty_engine(tiny_engine: Any) -> Any:
    from scoring.engine import ScoringEngine
    from training.calibrate import fit_for_engine

    ref = [Item(prompt=f"question {n}", response="an answer " * (1 + n % 7)) for n in range(120)]
    stat, info = fit_for_engine(tiny_engine, ref[:90], ref[90:])
    rm = replace(
        tiny_engine.rm, manifest=tiny_engine.manifest.model_copy(update={"novelty": info}), novelty=stat
    )
    return ScoringEngine(rm, policy=tiny_engine.policy)


@pytest.fixture(scope="module")
def server(novelty_engine: Any) -> Iterator[Live]:
    with live_server(Settings(), novelty_engine) as live:
        yield live


def _served(engine: Any) -> list[Any]:
    return engine.score([Item(prompt=p, response=a) for p, a in zip(PROMPTS, ANSWERS, strict=True)])


def test_client_parses_novelty_and_sends_lcb_beta(server: Live, novelty_engine: Any) -> None:
    want = _served(novelty_engine)
    info = novelty_engine.manifest.novelty
    with HydraClient(server.url) as c:
        got = c.score(list(zip(PROMPTS, ANSWERS, strict=True)), aggregation="lcb", lcb_beta=2.0)
    for g, w in zip(got, want, strict=True):
        assert g.novelty == pytest.approx(w.novelty, rel=1e-6) and 0 <= g.novelty_percentile <= 100
        assert g.reward == pytest.approx(w.mean - 2.0 * info.reward_std / info.median * w.novelty, rel=1e-5)


async def test_trl_logs_novelty(server: Live, novelty_engine: Any) -> None:
    metrics: dict[str, float] = {}
    extra: dict[str, list] = {}
    reward = HydraReward(server.url)
    await reward(PROMPTS, ANSWERS, log_metric=metrics.__setitem__, log_extra=extra.__setitem__)
    want = [s.novelty for s in _served(novelty_engine)]
    assert metrics["hydra/novelty"] == pytest.approx(fmean(want), rel=1e-5)
    assert 0 <= metrics["hydra/novelty_percentile"] <= 100 and 0 <= metrics["hydra/novelty_above_p95"] <= 1
    assert extra["hydra/novelty"] == pytest.approx(want, rel=1e-5)


def test_verl_result_has_novelty_keys(
    server: Live, novelty_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYDRA_RM_URL", server.url)
    out = verl.compute_score("src", ANSWERS[1], None, {"prompt": PROMPTS[1]})
    assert out["novelty"] == pytest.approx(_served(novelty_engine)[1].novelty, rel=1e-5)
    assert 0 <= out["novelty_percentile"] <= 100
