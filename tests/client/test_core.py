"""The client's pure decisions: splitting, Retry-After, backoff, replica rotation."""

from __future__ import annotations

import json
import random
import time
from email.utils import formatdate

import pytest

from client._core import (
    Backoff,
    Limits,
    ReplicaPool,
    encode_items,
    limits_from,
    normalize_item,
    parse_retry_after,
    parse_urls,
    score_body,
    split,
)


def test_split_respects_item_and_byte_limits_and_keeps_order() -> None:
    rng = random.Random(0)
    items = [{"text": "x" * rng.randint(0, 300), "i": i} for i in range(500)]
    encoded = encode_items(items)
    limits = Limits(max_items=37, max_body_bytes=4000)
    chunks = split(encoded, limits)
    assert [i for c in chunks for i in c] == list(range(500))  # every item once, in order
    for c in chunks:
        body = score_body([encoded[i] for i in c], {"aggregation": "min"})
        assert len(c) <= 37
        assert len(body) <= 4000
        assert [it["i"] for it in json.loads(body)["items"]] == list(c)


def test_an_item_larger_than_the_body_limit_goes_alone() -> None:
    encoded = encode_items(["a", "b" * 5000, "c"])
    assert split(encoded, Limits(100, 1000)) == [range(0, 1), range(1, 2), range(2, 3)]


def test_items_in_every_form() -> None:
    assert normalize_item("t", 0) == {"text": "t"}
    assert normalize_item(("p", "r"), 0) == {"prompt": "p", "response": "r"}
    assert normalize_item({"messages": []}, 0) == {"messages": []}
    with pytest.raises(TypeError, match=r"items\[3\]"):
        normalize_item(42, 3)
    body = json.loads(score_body(encode_items(["é"]), {}))
    assert body == {"items": [{"text": "é"}]}


def test_limits_from_card_then_openapi_then_defaults() -> None:
    openapi = {"components": {"schemas": {"ScoreRequest": {"properties": {"items": {"maxItems": 64}}}}}}
    assert limits_from({"max_items_per_request": 8, "max_body_bytes": 999}, openapi) == Limits(8, 999)
    assert limits_from({}, openapi).max_items == 64
    assert limits_from({}, None) == Limits()


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = time.time()
    assert parse_retry_after(formatdate(now + 10, usegmt=True), now=now) == pytest.approx(10, abs=1)
    assert parse_retry_after(formatdate(now - 10, usegmt=True), now=now) == 0.0


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    b = Backoff(base=0.5, cap=4.0, rng=random.Random(1))
    for attempt, full in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        delays = [b.delay(attempt) for _ in range(200)]
        assert min(delays) >= full * 0.5 and max(delays) <= full
        assert len(set(delays)) > 100  # jittered, not one value


def test_pool_round_robin_skips_failed_replica_and_retries_it_later() -> None:
    pool = ReplicaPool(["http://a", "http://b", "http://c"], Backoff(base=1.0, cap=8.0))
    assert [pool.pick(now=0)[0].url for _ in range(6)] == ["http://a", "http://b", "http://c"] * 2
    b = pool.replicas[1]
    cooldown = pool.failed(b, now=0)
    assert 0.5 <= cooldown <= 1.0
    assert [pool.pick(now=0.1)[0].url for _ in range(4)] == ["http://a", "http://c", "http://a", "http://c"]
    assert "http://b" in [pool.pick(now=1.01)[0].url for _ in range(3)]  # back in rotation after cooldown
    pool.failed(b, retry_after=5.0, now=2)  # Retry-After beats a shorter backoff
    assert b.down_until == pytest.approx(7.0)


def test_pool_all_down_waits_for_the_first_to_come_back() -> None:
    pool = ReplicaPool(["http://a", "http://b"], Backoff(base=1.0, cap=8.0))
    pool.failed(pool.replicas[0], retry_after=3.0, now=0)
    pool.failed(pool.replicas[1], retry_after=2.0, now=0)
    assert pool.wait_time(now=0.5) == pytest.approx(1.5)
    replica, wait = pool.pick(now=0.5)
    assert replica.url == "http://b" and wait == pytest.approx(1.5)
    pool.succeeded(pool.replicas[0])
    assert pool.pick(now=0.5) == (pool.replicas[0], 0.0)


def test_parse_urls_accepts_openrlhf_style_values() -> None:
    assert parse_urls("http://a:8000/get_reward, http://b:8000/") == ["http://a:8000", "http://b:8000"]
    assert parse_urls(["http://a/v1/score"]) == ["http://a"]
    with pytest.raises(ValueError):
        parse_urls(" , ")
