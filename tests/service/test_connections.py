"""Connection-level guards, with real sockets against a real uvicorn on 127.0.0.1: a deadline on the
request head (idle and header-trickling sockets get 408 and are closed) and a connection limit that
serves up to its limit and refuses the rest with the documented JSON 503."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from scoring.settings import Settings
from tests.service.conftest import live_server, wait_until
from tests.service.test_slow_clients import _read_all, slow_bodies

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@contextmanager
def sockets(url: str, n: int) -> Iterator[list[socket.socket]]:
    host, port = url.removeprefix("http://").split(":")
    socks = [socket.create_connection((host, int(port))) for _ in range(n)]
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def _response(s: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One response from a socket that may stay open (reads the head, then content-length bytes)."""
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += s.recv(65536)
    return int(lines[0].split()[1]), headers, body


def _timed_out(data: bytes) -> dict:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), data
    assert b"content-type: application/json" in head.lower()
    return json.loads(body)["error"]


def test_idle_sockets_get_408_and_are_closed_within_the_head_timeout(tiny_engine) -> None:
    with live_server(Settings(head_timeout_s=1.0), tiny_engine) as live, sockets(live.url, 20) as socks:
        start = time.monotonic()
        answers = [_read_all(s, timeout=5.0) for s in socks]  # fails if a socket is still open at 5 s
        elapsed = time.monotonic() - start
        for data in answers:
            error = _timed_out(data)
            assert error["type"] == "request_timeout" and error["field"] == "headers"
        assert elapsed < 3.0
        wait_until(lambda: len(live.server.server_state.connections) == 0, what="the sockets to be dropped")
        assert live.metric("hydra_rm_rejected_requests_total", {"reason": "request_timeout"}) == 20


def test_a_trickled_head_gets_408_at_the_deadline_not_after_the_last_byte(tiny_engine) -> None:
    with live_server(Settings(head_timeout_s=1.0), tiny_engine) as live, sockets(live.url, 1) as [s]:
        start = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        # A header line every 0.1 s until 0.8 s: a timer on idle gaps would never fire.
        while time.monotonic() - start < 0.8:
            time.sleep(0.1)
            s.sendall(b"X-Slow: 1\r\n")
        data = _read_all(s, timeout=5.0)
        assert _timed_out(data)["type"] == "request_timeout"
        assert time.monotonic() - start < 1.75


def test_a_kept_alive_connection_times_each_head_from_its_first_byte(tiny_engine) -> None:
    with live_server(Settings(head_timeout_s=1.0), tiny_engine) as live, sockets(live.url, 1) as [s]:
        time.sleep(0.6)
        s.sendall(REQUEST)
        assert _response(s)[0] == 200
        time.sleep(0.6)  # 1.2 s after connecting: a deadline from the connection would have passed
        s.sendall(REQUEST)
        assert _response(s)[0] == 200


def test_idle_sockets_hold_no_connection_slot(tiny_engine) -> None:
    settings = Settings(max_connections=5, head_timeout_s=30.0)
    with live_server(settings, tiny_engine) as live, sockets(live.url, 5):
        wait_until(lambda: len(live.server.server_state.connections) == 5, what="5 idle connections")
        for _ in range(3):
            r = httpx.post(f"{live.url}/get_reward", json={"query": ["legitimate"]}, timeout=10)
            assert r.status_code == 200, r.text


def test_a_flood_past_the_limit_serves_up_to_it_and_refuses_the_rest_in_json(tiny_engine) -> None:
    settings = Settings(max_connections=10, retry_after_s=3)
    with live_server(settings, tiny_engine) as live, sockets(live.url, 25) as socks:
        wait_until(lambda: len(live.server.server_state.connections) == 25, what="25 connections")
        answers = []
        for s in socks:  # every socket is open before any sends: the first 10 heads take the slots
            s.sendall(REQUEST)
            answers.append(_response(s))
        assert [a[0] for a in answers] == [200] * 10 + [503] * 15
        for _status, headers, body in answers[10:]:
            assert headers["content-type"] == "application/json" and headers["retry-after"] == "3"
            assert headers["connection"] == "close"
            assert json.loads(body)["error"]["type"] == "overloaded"
        for s in socks[:10]:  # a served connection keeps its slot for its next request
            s.sendall(REQUEST)
            assert _response(s)[0] == 200


def test_a_slot_is_freed_when_its_connection_closes(tiny_engine) -> None:
    settings = Settings(max_connections=4)
    with live_server(settings, tiny_engine) as live:
        with slow_bodies(live.url, 4):  # heads complete, bodies stalled: 4 slots held
            wait_until(lambda: len(live.server.server_state.connections) == 4, what="4 slow connections")
            refused = httpx.post(f"{live.url}/get_reward", json={"query": ["one too many"]}, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "overloaded"
            assert refused.headers["retry-after"] == "1"
        wait_until(lambda: len(live.server.server_state.connections) == 0, what="the slow sockets to close")
        r = httpx.post(f"{live.url}/get_reward", json={"query": ["room again"]}, timeout=10)
        assert r.status_code == 200


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_both_http_implementations_are_guarded(tiny_engine, http: str) -> None:
    import threading

    import uvicorn

    from service.app import create_app
    from service.server import HydraServer

    app = create_app(Settings(head_timeout_s=0.5), engine=tiny_engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = HydraServer(uvicorn.Config(app, log_level="critical", http=http, limit_concurrency=1))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, what="server start")
    try:
        with sockets(f"http://127.0.0.1:{port}", 2) as [idle, served]:
            served.sendall(REQUEST)
            assert _response(served)[0] == 200
            assert _timed_out(_read_all(idle, timeout=5.0))["field"] == "headers"
            with sockets(f"http://127.0.0.1:{port}", 1) as [late]:
                late.sendall(REQUEST)
                status, headers, body = _response(late)
                assert status == 503 and json.loads(body)["error"]["type"] == "overloaded"
    finally:
        srv.should_exit = True
        thread.join(30)
