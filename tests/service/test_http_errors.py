"""Requests the HTTP parser rejects get the documented error body, not uvicorn's plain-text 400.

Both of uvicorn's HTTP implementations are covered: httptools (the default, from the lock) and h11
(the fallback). h11 accepts any token as a method, so there an unknown method reaches the app and
gets its 405; httptools refuses it in the parser.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from scoring.settings import Settings
from service.app import create_app
from service.server import HydraServer


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(request: pytest.FixtureRequest, tiny_engine: Any) -> Iterator[tuple[str, int]]:
    app = create_app(Settings(), engine=tiny_engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = HydraServer(uvicorn.Config(app, log_level="critical", http=request.param))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server failed to start"
        time.sleep(0.01)
    yield request.param, port
    srv.should_exit = True
    thread.join(30)


def _exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(raw)
        data = b""
        while chunk := conn.recv(65536):  # every one of these answers closes the connection
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _error(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    assert headers["content-type"] == "application/json", body
    payload = json.loads(body)
    assert set(payload) == {"error"} and set(payload["error"]) == {"type", "message", "field"}
    return payload["error"]


BODY = b'{"items": [{"text": "hi"}]}'


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n" + BODY, "Content-Length"),
        (b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n" + BODY, "Content-Length"),
        (b"P@ST /v1/score HTTP/1.1\r\nHost: x\r\n\r\n", None),
        (b"POST /v1/score HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", None),
    ],
    ids=["content-length-text", "content-length-negative", "illegal-method-token", "header-without-colon"],
)
def test_malformed_requests_get_the_documented_400(
    server: tuple[str, int], raw: bytes, field: str | None
) -> None:
    _, port = server
    status, headers, body = _exchange(port, raw)
    assert status == 400
    error = _error(headers, body)
    assert error["type"] == "bad_request" and "malformed HTTP request" in error["message"]
    assert headers["connection"] == "close"
    if field is not None:
        assert error["field"] == field
    _assert_still_serving(port)


def _assert_still_serving(port: int) -> None:
    raw = (
        b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(BODY)}\r\n\r\n".encode()
        + BODY
    )
    status, _, body = _exchange(port, raw)
    assert status == 200, body
    assert len(json.loads(body)["results"]) == 1


def test_duplicate_content_length_is_refused_in_shape(server: tuple[str, int]) -> None:
    _, port = server
    raw = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 27\r\nContent-Length: 5\r\n\r\n" + BODY
    status, headers, body = _exchange(port, raw)
    assert status == 400
    error = _error(headers, body)
    assert error["type"] == "bad_request" and error["field"] == "Content-Length"


def test_unknown_method_is_refused_in_shape(server: tuple[str, int]) -> None:
    impl, port = server
    if impl == "h11":
        pytest.skip("h11 passes any method token to the app, whose 405 already has the error body")
    status, headers, body = _exchange(port, b"FOO /v1/score HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    error = _error(headers, body)
    assert (status, error["type"], error["field"]) == (400, "bad_request", "method")  # refused by the parser
