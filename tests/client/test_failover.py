"""Replicas dying under a running client: nothing lost, nothing duplicated, answers keep coming."""

from __future__ import annotations

import signal
import threading
import time

import httpx

from client import AsyncHydraClient, HydraClient
from scoring.settings import Settings
from tests.client.conftest import assert_matches, free_port, live_on_port, reference, texts
from tests.service.conftest import live_server, metric_value, wait_until
from tests.service.test_server import start_server


def test_server_killed_and_restarted_mid_run_loses_and_duplicates_nothing(
    tiny_llama_dir, tiny_engine, tmp_path
):
    """A real `hydra-rm serve` process is SIGKILLed mid-run; a replica comes back on the same port
    (in-process, to keep the test short: a second cold start of torch costs 5-30 s on a busy machine)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # One item per forward and 8 per request: the run lasts long enough to be cut in the middle.
    env = {
        "HYDRA_RM_MAX_ITEMS_PER_REQUEST": "8",
        "HYDRA_RM_MAX_BATCH_SIZE": "1",
        "HYDRA_RM_TOKEN_BUDGET": "64",
    }
    proc, _ = start_server(tmp_path, "--model", str(tiny_llama_dir), port=port, **env)
    items = texts(400, "kill")
    events: dict[str, float] = {}
    stop = threading.Event()

    def scored() -> float:
        try:
            return metric_value(httpx.get(f"{url}/metrics", timeout=2).text, "hydra_rm_items_scored_total")
        except httpx.HTTPError:
            return 0.0

    def kill_then_restart() -> None:
        wait_until(lambda: scored() >= 80, timeout=60, what="the run to be under way")
        proc.send_signal(signal.SIGKILL)  # no drain: requests in flight are cut off
        proc.wait(10)
        events["killed"] = time.monotonic()
        time.sleep(0.5)
        settings = Settings(max_items_per_request=8, max_batch_size=1, token_budget=64)
        with live_on_port(port, settings, tiny_engine) as back:
            events["restarted"] = time.monotonic()
            stop.wait(120)
            events["scored_after"] = back.metric("hydra_rm_items_scored_total")

    retries: list[str] = []
    killer = threading.Thread(target=kill_then_restart, daemon=True)
    try:
        with HydraClient(
            url,
            concurrency=2,
            retries=30,
            backoff_max=1.0,
            on_retry=lambda *a: retries.append(type(a[1]).__name__),
        ) as rm:
            rm.limits()
            killer.start()
            result = rm.score(items)
            events["done"] = time.monotonic()
        stop.set()
        killer.join(60)
        assert events["killed"] < events["restarted"] < events["done"]  # the run spanned the outage
        assert retries and "ConnectError" in retries
        assert 0 < events["scored_after"] < len(items)  # the replacement scored the rest, not everything
        assert_matches(result, reference(tiny_engine, items))  # each item once, in order, right reward
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def test_two_servers_one_stopped_keep_answering(tiny_engine):
    settings = Settings(max_items_per_request=16)
    first, second = live_server(settings, tiny_engine), live_server(settings, tiny_engine)
    a, b = first.__enter__(), second.__enter__()
    try:
        retries: list[str] = []
        # A dead replica cools down 1-2 s after its first failure and 2-4 s after its second, longer
        # than the rounds below take: so it is tried at most twice, never on every request.
        async with AsyncHydraClient(
            [a.url, b.url], concurrency=2, backoff_base=2.0, on_retry=lambda u, *_: retries.append(u)
        ) as rm:
            items = texts(64, "two")
            assert_matches(await rm.score(items), reference(tiny_engine, items))
            served = {
                live.url: live.metric("hydra_rm_requests_total", {"endpoint": "/v1/score"}) for live in (a, b)
            }
            assert all(n >= 1 for n in served.values()), served  # round-robin used both
            first.__exit__(None, None, None)  # replica a goes away
            before_b = b.metric("hydra_rm_requests_total", {"endpoint": "/v1/score"})
            for round_ in range(3):
                items = texts(64, f"after{round_}")
                assert_matches(await rm.score(items), reference(tiny_engine, items))
            assert b.metric("hydra_rm_requests_total", {"endpoint": "/v1/score"}) - before_b >= 12
            assert retries and set(retries) == {a.url}
            assert len(retries) <= 2  # skipped while it cools down, not hit on each of the 12 requests
    finally:
        second.__exit__(None, None, None)
