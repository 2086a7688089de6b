"""The batcher seen from outside, through a real server: concurrency, overload, deadlines, hang-ups,
failing batches. A gate in the engine (tests' ControlledEngine) makes each scenario deterministic:
requests are queued while a forward is held, then released; nothing here depends on timing."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from scoring.engine import Item
from scoring.settings import Settings
from tests.service.conftest import live_server, wait_until

WORDS = "the quick brown fox jumps over a lazy dog while reward heads disagree".split()


def mixed_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic texts of 1 to ~60 words, so batches mix lengths and need padding."""
    out = []
    for i in range(n):
        k = 1 + (i * 37 + seed * 11) % 60
        out.append(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(k)) + f" #{i}")
    return out


async def _post_all(url: str, bodies: list[tuple[str, dict]], timeout: float = 60.0) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as c:
        return list(await asyncio.gather(*(c.post(path, json=body) for path, body in bodies)))


def post_concurrently(url: str, bodies: list[tuple[str, dict]]) -> list[httpx.Response]:
    return asyncio.run(_post_all(url, bodies))


def in_background(fn, *args):
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn(*args)), daemon=True)
    thread.start()
    return thread, box


def test_64_concurrent_clients_get_the_sequential_rewards(controlled):
    texts = mixed_texts(64)
    with live_server(Settings(), controlled) as live, live.client() as c:
        sequential = []
        for t in texts:
            r = c.post("/v1/score", json={"items": [{"text": t}]})
            assert r.status_code == 200
            sequential.append(r.json()["results"][0])
        calls_before = controlled.calls
        # Hold the engine so all 64 requests (plus one multi-item request) queue up together.
        controlled.gate.clear()
        controlled.entered.clear()
        bodies = [("/v1/score", {"items": [{"text": t}]}) for t in texts]
        bodies.append(("/v1/score", {"items": [{"text": t} for t in texts[::-1]]}))
        thread, box = in_background(post_concurrently, live.url, bodies)
        wait_until(lambda: live.service.batcher.queued_items == 64 + 64, what="all items queued")
        controlled.gate.set()
        thread.join(60)
        responses = box["result"]
    assert all(r.status_code == 200 for r in responses)
    concurrent = [r.json()["results"][0] for r in responses[:64]]
    reversed_multi = responses[64].json()["results"][::-1]
    for seq, con, multi in zip(sequential, concurrent, reversed_multi, strict=True):
        assert con["heads"] == pytest.approx(seq["heads"], abs=1e-5)  # padding-invariant
        assert multi["heads"] == pytest.approx(seq["heads"], abs=1e-5)
        assert con["reward"] == pytest.approx(seq["reward"], abs=1e-5)
        assert con["tokens"] == seq["tokens"]
    # 128 items went through far fewer forwards than items: batching crossed requests.
    assert controlled.calls - calls_before < 40
    assert max(controlled.batches[-(controlled.calls - calls_before) :]) > 1


def test_full_queue_gives_503_with_retry_after_and_loses_nothing(controlled, tiny_engine):
    texts = mixed_texts(13, seed=1)
    settings = Settings(max_queue_items=4, retry_after_s=2)
    with live_server(settings, controlled) as live:
        encoded: list[int] = []
        inner_encode = tiny_engine.encode
        controlled.encode = lambda item: encoded.append(1) or inner_encode(item)
        controlled.gate.clear()
        controlled.entered.clear()
        first_thread, first = in_background(
            post_concurrently, live.url, [("/get_reward", {"query": [texts[0]]})]
        )
        assert controlled.entered.wait(30)  # the first request is inside the (held) engine
        rest = [("/get_reward", {"query": [t]}) for t in texts[1:]]
        thread, box = in_background(post_concurrently, live.url, rest)
        wait_until(
            lambda: live.metric("hydra_rm_rejected_requests_total", {"reason": "overloaded"}) == 9,
            what="9 rejections",
        )
        assert live.service.batcher.queued_items == 4
        assert len(encoded) == 4  # a full queue answers 503 before spending CPU on tokenizing
        controlled.gate.set()
        thread.join(60)
        first_thread.join(60)
        responses = first["result"] + box["result"]
        healthy = live.client().post("/get_reward", json={"query": ["after the storm"]})
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 4 and statuses.count(503) == 9
    expected = tiny_engine.score([Item(text=t) for t in texts])
    for r, exp in zip(responses, expected, strict=True):
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "2"
            assert r.json()["error"]["type"] == "overloaded"
        else:  # every accepted request got its own reward, not a neighbour's
            assert r.json()["rewards"] == pytest.approx([exp.min], abs=1e-5)
    assert healthy.status_code == 200


def test_deadline_gives_504_and_drops_the_queued_items(controlled):
    settings = Settings(request_timeout_s=0.5)
    with live_server(settings, controlled) as live:
        controlled.gate.clear()
        controlled.entered.clear()
        t1, held = in_background(
            post_concurrently, live.url, [("/get_reward", {"query": ["held in the engine"]})]
        )
        assert controlled.entered.wait(30)
        t2, late = in_background(post_concurrently, live.url, [("/get_reward", {"query": ["never scored"]})])
        t1.join(30)
        t2.join(30)
        assert held["result"][0].status_code == 504
        late_response = late["result"][0]
        assert late_response.status_code == 504
        assert late_response.json()["error"]["type"] == "timeout"
        assert live.service.batcher.queued_items == 0  # dropped from the queue at once
        controlled.gate.set()
        after = live.client().post("/get_reward", json={"query": ["fresh"]})
        assert after.status_code == 200
    assert controlled.ids("never scored") not in controlled.forwarded


def test_a_client_that_hangs_up_stops_costing_compute(controlled):
    with live_server(Settings(), controlled) as live:
        controlled.gate.clear()
        controlled.entered.clear()
        t1, _ = in_background(
            post_concurrently, live.url, [("/get_reward", {"query": ["held in the engine"]})]
        )
        assert controlled.entered.wait(30)
        with pytest.raises(httpx.ReadTimeout), live.client(timeout=0.3) as impatient:
            impatient.post("/get_reward", json={"query": ["abandoned by its client"]})
        wait_until(lambda: live.service.batcher.queued_items == 1, what="the abandoned item to be dropped")
        assert live.metric("hydra_rm_rejected_requests_total", {"reason": "client_disconnected"}) == 1
        controlled.gate.set()
        t1.join(30)
    assert controlled.ids("abandoned by its client") not in controlled.forwarded


def test_a_failing_batch_fails_only_the_poison_request(controlled, tiny_engine):
    texts = mixed_texts(15, seed=2)
    poison = "this exact text makes the engine raise"
    controlled.poison(poison)
    with live_server(Settings(), controlled) as live:
        for round_ in range(2):  # twice: the poison must not drag its neighbours down again
            controlled.gate.clear()
            bodies = [("/get_reward", {"query": [t]}) for t in texts[:7]]
            bodies += [("/v1/score", {"items": [{"text": poison}]})]
            bodies += [("/get_reward", {"query": [t]}) for t in texts[7:]]
            thread, box = in_background(post_concurrently, live.url, bodies)
            wait_until(lambda: live.service.batcher.queued_items == 16, what="16 items queued")
            failed_before = controlled.failed_calls
            controlled.gate.set()
            thread.join(60)
            responses = box["result"]
            bad = responses.pop(7)
            assert bad.status_code == 500
            assert bad.json()["error"]["type"] == "scoring_failed"
            message = bad.json()["error"]["message"]
            assert "RuntimeError" in message and "server log" in message
            assert "poisoned item" not in message  # engine internals stay in the log
            assert "Traceback" not in bad.text
            expected = tiny_engine.score([Item(text=t) for t in texts])
            for r, exp in zip(responses, expected, strict=True):
                assert r.status_code == 200, (round_, r.text)
                assert r.json()["rewards"] == pytest.approx([exp.min], abs=1e-5)
            # Bisection: the poison is found in O(log n) failing forwards, not n.
            assert controlled.failed_calls - failed_before <= 6
        with live.client() as c:
            assert c.get("/readyz").status_code == 200
            assert c.post("/get_reward", json={"query": ["still serving"]}).status_code == 200
        assert live.metric("hydra_rm_batch_failures_total") >= 2


def test_tokenizer_backlog_is_bounded(tiny_engine, monkeypatch):
    """Large requests queue for the one tokenizer thread; past the backlog they get 503, not a wait."""
    import threading

    import service.runtime as runtime

    monkeypatch.setattr(runtime, "TOKENIZER_BACKLOG", 1)
    release = threading.Event()
    inner_encode = tiny_engine.encode

    class SlowTokenizer:  # a real engine whose tokenizing is held, to fill the backlog deterministically
        def __getattr__(self, name):
            return getattr(tiny_engine, name)

        def encode(self, item):
            release.wait(30)
            return inner_encode(item)

    big = {"query": [f"text {i}" for i in range(20)]}  # > 8 items: tokenized off the loop
    with live_server(Settings(), SlowTokenizer()) as live:
        first_thread, first = in_background(post_concurrently, live.url, [("/get_reward", big)])
        wait_until(lambda: live.service.tokenizer.requests == 1, what="first request in the tokenizer")
        second = live.client().post("/get_reward", json=big)
        assert second.status_code == 503 and second.headers["Retry-After"]
        release.set()
        first_thread.join(60)
    assert first["result"][0].status_code == 200 and len(first["result"][0].json()["rewards"]) == 20
