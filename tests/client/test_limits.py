"""The limits contract: the server states its item and body limits on its model card, and the client
sizes its requests by what it reads there (no configuration on the client side)."""

from __future__ import annotations

import json

from client import AsyncHydraClient, HydraClient
from scoring.settings import Settings
from tests.client.conftest import assert_matches, reference, texts
from tests.service.conftest import live_server

BODY_LIMIT = 2048  # bytes: a few dozen of these items per request


def test_model_card_states_the_limits_and_the_client_stays_under_a_small_body_limit(tiny_engine):
    items = texts(120, "limit")
    body = len(json.dumps({"items": [{"text": t} for t in items]}).encode())
    assert body > 3 * BODY_LIMIT  # one request could not carry them
    settings = Settings(max_body_bytes=BODY_LIMIT, max_items_per_request=500)
    with live_server(settings, tiny_engine) as live:
        card = live.client().get("/v1/models").json()["data"][0]
        assert (card["max_items_per_request"], card["max_body_bytes"]) == (500, BODY_LIMIT)
        ok = {"endpoint": "/v1/score", "status": "200"}
        before = live.metric("hydra_rm_requests_total", ok)
        with HydraClient(live.url) as rm:
            limits = rm.limits()
            assert (limits.max_items, limits.max_body_bytes) == (500, BODY_LIMIT)  # read, not configured
            result = rm.score(items)
        assert result.errors == {}
        assert_matches(result, reference(tiny_engine, items))
        sent = live.metric("hydra_rm_requests_total", ok) - before
        assert sent >= body / BODY_LIMIT  # split by bytes, not by the item limit (500 would be one)
        assert live.metric("hydra_rm_rejected_requests", {"reason": "payload_too_large"}) == 0


async def test_async_client_reads_the_same_limits(tiny_engine):
    items = texts(60, "alimit")
    with live_server(Settings(max_body_bytes=BODY_LIMIT), tiny_engine) as live:
        async with AsyncHydraClient(live.url) as rm:
            assert (await rm.limits()).max_body_bytes == BODY_LIMIT
            result = await rm.score(items)
        assert result.errors == {}
        assert_matches(result, reference(tiny_engine, items))
        assert live.metric("hydra_rm_rejected_requests", {"reason": "payload_too_large"}) == 0
