"""HydraClient and AsyncHydraClient are one flow (client/_client.py's sans-IO generators) under two
drivers: against the same scripted server they send the same requests in the same order, report the
same retries and return the same results, through failover, Retry-After, a transport error, the
OpenAPI fallback, 413 bisection and bad-item isolation."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

import client._core
from client import AsyncHydraClient, HydraClient, HydraHTTPError, HydraUnavailable

HEADS = ["a", "b"]
CARD = {  # no limits on the card: the client must ask /openapi.json, which this server does not serve
    "id": "m",
    "version": "1",
    "num_heads": 2,
    "head_names": HEADS,
    "default_aggregation": "min",
    "uwo_lambda": 0.5,
    "max_length": 64,
    "token_budget": 1024,
    "max_batch_size": 8,
}
MAX_ITEMS = 3  # more per request is a 413: the client only learns it by being refused


def _error(status: int, type_: str, message: str, field: str | None = None, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"type": type_, "message": message, "field": field}}, headers=headers
    )


class Scripted:
    """A two-replica server as a pure function of the request sequence, logging every request."""

    def __init__(self, down: bool = False) -> None:
        self.down = down  # every call answers 503: the retry budget runs out
        self.log: list[tuple[str, str, str, int | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        items = json.loads(request.content)["items"] if request.content else None
        n = len(self.log)
        self.log.append((request.method, request.url.host, request.url.path, len(items) if items else None))
        if self.down:  # both replicas cool down for Retry-After at once: the client must sleep
            return _error(503, "overloaded", "queue full", **{"Retry-After": "0.05"})
        if request.url.path == "/v1/models":
            if n == 0:  # first replica is overloaded: Retry-After, then failover to the other
                return _error(503, "overloaded", "queue full", **{"Retry-After": "0"})
            return httpx.Response(200, json={"object": "list", "data": [CARD]})
        if request.url.path == "/openapi.json":
            return _error(404, "not_found", "no schema")
        if not any(p == "/v1/score" for _, _, p, _ in self.log[:-1]):
            raise httpx.ConnectError("connection refused", request=request)  # a replica dropped away
        if len(items) > MAX_ITEMS:
            return _error(413, "payload_too_large", "too many items")
        if any(it["text"] == "bad" for it in items):
            return _error(422, "invalid_request", "bad item", "items")
        results = [_result(it["text"]) for it in items]
        return httpx.Response(
            200,
            json={
                "model": "m",
                "version": "1",
                "aggregation": "min",
                "head_names": HEADS,
                "results": results,
            },
        )


def _result(text: str) -> dict[str, Any]:
    r = float(sum(map(ord, text)))  # distinct per item: a result at the wrong index cannot match
    heads = {"a": r, "b": r + 1}
    return {
        "reward": r,
        "heads": heads,
        "min": r,
        "max": r + 1,
        "mean": r + 0.5,
        "std": 0.5,
        "tokens": len(text),
        "truncated": False,
    }


class Clock:
    """Monotonic time that advances one tick per reading: the same flow reads it the same number of
    times in the same order, so replica cooldowns end at the same step in both clients."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 0.01
        return self.now


def _kwargs(retries: list[tuple[str, str, int, float]]) -> dict[str, Any]:
    return {
        "seed": 0,
        "concurrency": 1,
        "backoff_base": 0.001,
        "backoff_max": 0.002,
        "retries": 6,
        "on_retry": lambda url, e, attempt, wait: retries.append(
            (url, type(e).__name__, attempt, round(wait, 6))
        ),
    }


ITEMS = [f"item {i}" if i != 6 else "bad" for i in range(10)]


def _outcome(run: Any) -> tuple[Any, ...]:
    try:
        result = run()
    except (HydraHTTPError, HydraUnavailable) as e:
        return ("raised", type(e).__name__, str(e))
    errors = {i: (e.status, e.field) for i, e in result.errors.items()}
    return ("ok", [None if s is None else (s.reward, s.heads) for s in result], errors)


def _sync(server: Scripted, on_error: str) -> tuple[Any, list[Any]]:
    retries: list[Any] = []
    with HydraClient("http://a,http://b", transport=httpx.MockTransport(server), **_kwargs(retries)) as rm:
        out = _outcome(lambda: rm.score(ITEMS, on_error=on_error))
    return out, retries


async def _async(server: Scripted, on_error: str) -> tuple[Any, list[Any]]:
    retries: list[Any] = []
    async with AsyncHydraClient(
        "http://a,http://b", transport=httpx.MockTransport(server), **_kwargs(retries)
    ) as rm:
        try:
            result = await rm.score(ITEMS, on_error=on_error)
        except (HydraHTTPError, HydraUnavailable) as e:
            return ("raised", type(e).__name__, str(e)), retries
        out = _outcome(lambda: result)
    return out, retries


@pytest.mark.parametrize(("on_error", "down"), [("none", False), ("raise", False), ("raise", True)])
async def test_sync_and_async_send_the_same_requests_and_agree(monkeypatch, on_error, down) -> None:
    runs = []
    for kind in ("sync", "async"):
        monkeypatch.setattr(client._core, "time", SimpleNamespace(monotonic=Clock(), time=time.time))
        server = Scripted(down=down)
        out, retries = _sync(server, on_error) if kind == "sync" else await _async(server, on_error)
        runs.append((server.log, retries, out))
    (sync_log, sync_retries, sync_out), (async_log, async_retries, async_out) = runs
    assert async_log == sync_log
    assert async_retries == sync_retries
    assert async_out == sync_out

    if down:  # 1 + retries attempts, alternating replicas, then HydraUnavailable
        assert sync_out[:2] == ("raised", "HydraUnavailable") and len(sync_log) == 7
        assert [h for _, h, _, _ in sync_log] == ["a", "b", "a", "b", "a", "b", "a"]
        assert max(r[3] for r in sync_retries) > 0  # a planned wait: every replica was cooling down
        return
    # The path both took: 503 + failover, the OpenAPI fallback, a dropped connection retried on the
    # other replica, then 10 -> 5 + 5 -> ... bisection under the 413s, the bad item cornered by 422s.
    assert sync_log[:3] == [("GET", "a", "/v1/models", None), ("GET", "b", "/v1/models", None)] + [
        ("GET", "a", "/openapi.json", None)
    ]
    assert sync_log[3][2:] == ("/v1/score", 10) and sync_log[4][2:] == ("/v1/score", 10)
    assert sync_log[3][1] != sync_log[4][1]  # the retry went to the other replica
    assert [t for _, _, _, t in sync_log[5:7]] == [5, 2]  # bisection began
    assert [r[1] for r in sync_retries] == ["HydraHTTPError", "ConnectError"]
    if on_error == "raise":
        assert sync_out[:2] == ("raised", "HydraHTTPError") and "bad item" in sync_out[2]
    else:
        _, scores, errors = sync_out
        assert errors == {6: (422, "items")}
        assert scores[6] is None
        assert [s[0] for i, s in enumerate(scores) if i != 6] == [
            _result(t)["reward"] for t in ITEMS if t != "bad"
        ]
