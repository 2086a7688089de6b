"""HydraClient and AsyncHydraClient against a real server: rewards, splitting, errors, Retry-After."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from client import AsyncHydraClient, HydraClient, HydraHTTPError, HydraUnavailable, ScoreList
from scoring.settings import Settings
from tests.client.conftest import SPLIT_LIMIT, assert_matches, reference, texts
from tests.service.conftest import ControlledEngine, live_server, wait_until

SCORE = {"endpoint": "/v1/score"}


def _requests(live, status: str) -> float:
    return live.metric("hydra_rm_requests_total", {**SCORE, "status": status})


def test_rewards_equal_the_engine_in_input_order_split_under_the_advertised_limit(server, tiny_engine):
    items = texts(100)
    before = _requests(server, "200")
    with HydraClient(server.url) as rm:
        assert rm.limits().max_items == SPLIT_LIMIT  # discovered from the server, not configured
        result = rm.score(items)
    assert isinstance(result, ScoreList) and result.errors == {}
    assert_matches(result, reference(tiny_engine, items))
    assert _requests(server, "200") - before == -(-100 // SPLIT_LIMIT)  # 7 requests, none over the limit
    assert result.head_names == tiny_engine.head_names and result.aggregation == "min"
    s = result[3]
    assert list(s.heads) == tiny_engine.head_names
    assert s.min == min(s.heads.values()) and s.max == max(s.heads.values())
    assert s.tokens > 0 and s.truncated is False and s.std >= 0


def test_item_forms_and_aggregation(server, tiny_engine):
    items = [("What is 2+2?", "4"), {"messages": [{"role": "user", "content": "hi"}]}, "raw text"]
    with HydraClient(server.url) as rm:
        mean = rm.score(items, aggregation="mean")
        heads_off = rm.score_texts(["raw text"], return_heads=False)
    engine_items = [{"prompt": "What is 2+2?", "response": "4"}, items[1], {"text": "raw text"}]
    assert_matches(mean, reference(tiny_engine, engine_items, "mean"))
    assert mean.aggregation == "mean"
    assert heads_off[0].heads == {} and heads_off[0].reward == pytest.approx(mean[2].min, abs=1e-6)


async def test_async_client_agrees_with_the_engine(server, tiny_engine):
    items = texts(70, "async")
    async with AsyncHydraClient(server.url, concurrency=3) as rm:
        result = await rm.score(items)
        info = await rm.model_info()
    assert_matches(result, reference(tiny_engine, items))
    assert info.head_names == tiny_engine.head_names and info.num_heads == len(info.head_names)


def test_4xx_is_raised_at_once_and_not_retried(server):
    before = _requests(server, "422")
    retries: list[object] = []
    with HydraClient(server.url, on_retry=lambda *a: retries.append(a)) as rm:
        rm.limits()
        with pytest.raises(HydraHTTPError) as e:
            rm.score(["a", "b"], aggregation="head:99")
    assert e.value.status == 422 and e.value.field == "aggregation" and e.value.type == "invalid_request"
    assert retries == [] and _requests(server, "422") - before == 1


def test_api_key(tiny_engine):
    with live_server(Settings(api_keys=["secret"]), tiny_engine) as live:
        with HydraClient(live.url, api_key="secret") as rm:
            assert rm.score(["hi"])[0].reward == pytest.approx(
                reference(tiny_engine, ["hi"])[0]["reward"], abs=1e-5
            )
        with HydraClient(live.url, api_key="wrong") as rm, pytest.raises(HydraHTTPError) as e:
            rm.score(["hi"])
        assert e.value.status == 401
        assert live.metric("hydra_rm_requests_total", {"status": "401"}) == 1  # not retried


def test_retry_after_is_honoured(tiny_engine):
    """A full queue answers 503 + Retry-After: 2; the client waits that long, not its own 50 ms backoff."""
    engine = ControlledEngine(tiny_engine)
    settings = Settings(max_queue_items=1, retry_after_s=2)
    with live_server(settings, engine) as live:
        engine.gate.clear()
        holder = threading.Thread(
            target=lambda: httpx.post(f"{live.url}/v1/score", json={"items": [{"text": "hold"}]}, timeout=30)
        )
        holder.start()
        wait_until(engine.entered.is_set, what="the held forward")
        threading.Timer(0.3, engine.gate.set).start()  # the queue frees long before Retry-After ends
        waits: list[float] = []
        with HydraClient(
            live.url, backoff_base=0.05, max_items_per_request=8, on_retry=lambda *a: waits.append(a[3])
        ) as rm:
            t0 = time.monotonic()
            result = rm.score(["after the wait"])
            elapsed = time.monotonic() - t0
        holder.join(30)
        assert result[0].reward == pytest.approx(
            reference(tiny_engine, ["after the wait"])[0]["reward"], abs=1e-5
        )
        assert live.metric("hydra_rm_rejected_requests_total", {"reason": "overloaded"}) == 1
        assert len(waits) == 1 and waits[0] >= 1.95  # reported when planned; the retry waits until 2 s
        assert elapsed >= 2.0


def test_unreachable_raises_after_the_budget_with_the_last_error():
    with (
        socket_closed_port() as url,
        HydraClient(url, retries=2, backoff_base=0.01, max_items_per_request=4) as rm,
    ):
        t0 = time.monotonic()
        with pytest.raises(HydraUnavailable) as e:
            rm.score(["x"])
        assert time.monotonic() - t0 < 5
    assert isinstance(e.value.last_error, httpx.ConnectError)
    assert "after 3 attempts" in str(e.value)


def test_on_error_none_isolates_the_bad_item_and_says_why(tiny_engine):
    engine = ControlledEngine(tiny_engine)
    items = texts(12, "iso")
    engine.poison(items[5])
    with live_server(Settings(), engine) as live, HydraClient(live.url) as rm:
        with pytest.raises(HydraHTTPError) as e:
            rm.score(items)
        assert e.value.status == 500
        result = rm.score(items, on_error="none")
    assert result[5] is None and set(result.errors) == {5} and result.errors[5].status == 500
    expected = reference(tiny_engine, items)
    assert_matches([r for i, r in enumerate(result) if i != 5], [x for i, x in enumerate(expected) if i != 5])


class socket_closed_port:
    """A URL nothing listens on (bound, then closed)."""

    def __enter__(self) -> str:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        return None
