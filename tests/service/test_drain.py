"""A SIGTERM drain that outlives HYDRA_RM_DRAIN_TIMEOUT_S: what it cannot finish gets 503
`shutting_down` with Retry-After (never uvicorn's plain-text 500), and the exit code says so."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from scoring.engine import Item
from service.drain import EXIT_DRAIN_CUT_SHORT
from tests.service.conftest import metric_value
from tests.service.test_server import start_server

BIG_REQUESTS = 16  # 32 long items each, one item per forward: several seconds of queued work
SMALL_REQUESTS = 200  # OpenRLHF-shaped: one sample per request


def _texts(i: int) -> list[str]:
    return [f"request {i} item {j} " + "lorem ipsum dolor sit amet " * 20 for j in range(32)]


@pytest.fixture()
def short_drain_server(tiny_llama_dir: Path, tmp_path: Path):
    env = {
        "HYDRA_RM_TOKEN_BUDGET": "64",
        "HYDRA_RM_MAX_BATCH_SIZE": "1",
        "HYDRA_RM_DRAIN_TIMEOUT_S": "1",
        "HYDRA_RM_RETRY_AFTER_S": "2",
    }
    proc, url = start_server(tmp_path, "--model", str(tiny_llama_dir), **env)
    # Read the log while it runs: a server that logs a traceback per request would otherwise fill the
    # pipe and block (that is how the old code hung this test instead of failing it).
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.extend(iter(proc.stdout.readline, b"")), daemon=True)
    reader.start()
    yield proc, url, output, reader
    if proc.poll() is None:
        proc.kill()
        proc.wait()


async def _burst_then_sigterm(url: str, pid: int) -> tuple[list[httpx.Response], list[list[str]], float]:
    bodies = [{"items": [{"text": t} for t in _texts(i)]} for i in range(BIG_REQUESTS)]
    bodies += [
        {"items": [{"text": f"small request {i}: the cat sat on the mat"}]} for i in range(SMALL_REQUESTS)
    ]
    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        tasks = [asyncio.ensure_future(client.post("/v1/score", json=b)) for b in bodies]
        deadline = time.monotonic() + 60
        while True:  # every request received (in flight or answered) before the SIGTERM
            text = (await client.get("/metrics")).text
            in_flight = metric_value(text, "hydra_rm_requests_in_flight", {"endpoint": "/v1/score"})
            answered = metric_value(text, "hydra_rm_requests_total", {"endpoint": "/v1/score"})
            if in_flight + answered >= len(bodies):
                break
            assert time.monotonic() < deadline, f"only {in_flight + answered} of {len(bodies)} received"
            await asyncio.sleep(0.02)
        assert in_flight > BIG_REQUESTS, "too little was queued for the drain to be cut short"
        os.kill(pid, signal.SIGTERM)
        sigterm_at = time.monotonic()
        responses = await asyncio.gather(*tasks)
    return responses, [[it["text"] for it in b["items"]] for b in bodies], sigterm_at


def test_a_drain_cut_short_answers_503_shutting_down_and_exits_non_zero(short_drain_server, tiny_engine):
    proc, url, lines, reader = short_drain_server
    responses, texts, sigterm_at = asyncio.run(_burst_then_sigterm(url, proc.pid))
    code = proc.wait(timeout=60)
    exited_after = time.monotonic() - sigterm_at
    reader.join(10)
    output = b"".join(lines).decode()
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, f"statuses {sorted(set(statuses))}: {output[-2000:]}"
    refused = [r for r in responses if r.status_code == 503]
    assert refused, "the drain finished everything: the test queued too little"
    for r in refused:
        assert r.headers["content-type"] == "application/json", r.text
        assert r.json()["error"]["type"] == "shutting_down"
        assert r.headers["retry-after"] == "2"
    for r, t in zip(responses, texts, strict=True):  # what was answered was scored right
        if r.status_code == 200 and len(t) == 32:
            expected = [s.min for s in tiny_engine.score([Item(text=x) for x in t])]
            assert [x["reward"] for x in r.json()["results"]] == pytest.approx(expected, abs=1e-5)
    assert code == EXIT_DRAIN_CUT_SHORT != 0
    assert "Traceback" not in output and "CancelledError" not in output
    assert "drain timeout" in output
    assert exited_after < 30  # it stops at the drain deadline, not when the queue is empty


def test_a_request_still_sending_its_body_at_the_deadline_gets_503_not_500(tiny_engine):
    """The cut fails queued work; a request uvicorn must cancel at the deadline (here: one whose
    body never finishes) is answered by DrainGuard in the same shape."""
    import socket as socketlib
    import threading as th

    import uvicorn

    from scoring.settings import Settings
    from service.app import create_app
    from service.server import HydraServer

    app = create_app(Settings(retry_after_s=3), engine=tiny_engine)
    sock = socketlib.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = HydraServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = th.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    with socketlib.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        conn.sendall(b"Content-Length: 1000\r\n\r\n" + b'{"items": [')  # and nothing more
        wait_until_in_flight = time.monotonic() + 10
        while not server.server_state.tasks:
            assert time.monotonic() < wait_until_in_flight
            time.sleep(0.01)
        server.should_exit = True  # what SIGTERM sets
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    thread.join(30)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), raw
    assert b"retry-after: 3" in head.lower() and b"application/json" in head.lower()
    assert json.loads(body)["error"]["type"] == "shutting_down"
    assert server.drain_cut_short
