"""Slow or idle clients: a deadline on the body, arrivals counted only when progressing, a connection cap."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from scoring.settings import Settings
from tests.service.conftest import live_server, wait_until

HEAD = (
    b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
)


@contextmanager
def slow_bodies(url: str, n: int) -> Iterator[list[socket.socket]]:
    """n connections that sent their headers and the start of a body, then (almost) nothing."""
    host, port = url.removeprefix("http://").split(":")
    socks = [socket.create_connection((host, int(port))) for _ in range(n)]
    try:
        for s in socks:
            s.sendall(HEAD + b'{"query": [')
        yield socks
    finally:
        for s in socks:
            s.close()


def _read_all(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    chunks = []
    while True:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            raise AssertionError(
                f"connection still open after {timeout}s; got {b''.join(chunks)!r}"
            ) from None
        if not chunk:  # the server closed the connection
            return b"".join(chunks)
        chunks.append(chunk)


def test_a_slow_body_is_cut_off_with_408_and_the_connection_closed(tiny_engine) -> None:
    with live_server(Settings(body_timeout_s=1.0), tiny_engine) as live, slow_bodies(live.url, 1) as [s]:
        start = time.monotonic()
        # Still trickling in (a byte every 0.1 s) until 0.8 s: a timer on idle gaps would close the
        # connection 1.0 s after the last byte (>= 1.8 s), a deadline on the whole body at 1.0 s. The
        # trickle stops before the deadline: a byte sent after the server's close would be answered
        # with a reset that discards the 408 still unread in our socket buffer.
        while time.monotonic() - start < 0.8:
            time.sleep(0.1)
            s.sendall(b" ")
        response = _read_all(s, timeout=5.0)
        elapsed = time.monotonic() - start
        assert response.startswith(b"HTTP/1.1 408 "), response
        assert b'"type":"request_timeout"' in response and b'"field":"body"' in response
        assert elapsed < 1.75
        assert live.metric("hydra_rm_rejected_requests_total", {"reason": "request_timeout"}) == 1


def test_slow_bodies_do_not_count_as_arriving(tiny_engine) -> None:
    """The batcher waits for arriving requests: a stalled upload must not look like one."""
    with live_server(Settings(), tiny_engine) as live, slow_bodies(live.url, 5):
        wait_until(lambda: live.metric("hydra_rm_requests_in_flight", {"endpoint": "/get_reward"}) == 5)
        assert live.metric("hydra_rm_requests_arriving") == 0
        r = httpx.post(f"{live.url}/get_reward", json={"query": ["still answered"]}, timeout=10)
        assert r.status_code == 200


def test_connections_are_capped(tiny_engine) -> None:
    from service.server import build_server

    settings = Settings(max_connections=4)
    assert build_server(settings, app=object()).config.limit_concurrency == 4  # what `serve` runs with
    with live_server(settings, tiny_engine) as live, slow_bodies(live.url, 3):
        # uvicorn counts the new connection too: with 3 held, a 4th is the limit
        wait_until(lambda: len(live.server.server_state.connections) == 3, what="3 slow connections held")
        with httpx.Client(timeout=10) as c:
            refused = c.post(f"{live.url}/get_reward", json={"query": ["one too many"]})
        assert refused.status_code == 503
    with live_server(settings, tiny_engine) as live:  # the cap counts connections, not requests served
        for _ in range(6):
            assert httpx.post(f"{live.url}/get_reward", json={"query": ["fine"]}).status_code == 200
