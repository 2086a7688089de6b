"""Flow control as plain ASGI middleware (no BaseHTTPMiddleware: it breaks disconnect detection).

`ArrivalMiddleware` stamps each request's arrival (its deadlines count from there).
`BodyLimitMiddleware` reads the body under a size limit and a deadline (a client trickling a body
gets 408 and a closed connection), and only then counts a scoring request as arriving: the batcher
holds a part-full batch for requests on their way to the queue, and a stalled upload is not on its
way anywhere. It replays the body to the app; after the replay, `receive()` falls through to the
server, whose next message is `http.disconnect` when the client hangs up. That is what lets a
request whose client left stop costing compute.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ERROR_TYPE_KEY, error_response

ARRIVED_KEY = "hydra_rm.arrived"  # time.monotonic() when the request arrived: its deadline counts from here
_ARRIVING_KEY = "hydra_rm.arriving"  # True while the request is counted in Arrivals

SCORING_PATHS = frozenset({"/v1/score", "/get_reward", "/models/{name}/get_reward"})


def is_scoring_path(path: str) -> bool:
    """A request path that scores items (`/models/<name>/get_reward` included)."""
    return path in SCORING_PATHS or (path.startswith("/models/") and path.endswith("/get_reward"))


_NO_BODY = {"GET", "HEAD", "OPTIONS", "DELETE"}


class Arrivals:
    """Scoring requests received and not yet queued (body, validation, tokenization).

    The batcher's "more is coming" signal: it waits (up to max_wait_ms) for these, and only these,
    before flushing a part-full batch. Metrics read `count` for hydra_rm_requests_arriving.
    """

    def __init__(self) -> None:
        self.count = 0

    def more_coming(self) -> bool:
        return self.count > 0

    def begin(self, scope: Scope) -> None:
        if not scope.get(_ARRIVING_KEY):
            scope[_ARRIVING_KEY] = True
            self.count += 1

    def done(self, scope: Scope) -> None:
        """The request reached the queue, or failed before it: either way it is no longer arriving."""
        if scope.get(_ARRIVING_KEY):
            scope[_ARRIVING_KEY] = False
            self.count -= 1


class ArrivalMiddleware:
    """Stamps the arrival; whatever happens inside, a request leaving here is no longer arriving."""

    def __init__(self, app: ASGIApp, arrivals: Arrivals) -> None:
        self.app = app
        self.arrivals = arrivals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVED_KEY] = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            self.arrivals.done(scope)


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_timeout_s: float = 30.0,
        arrivals: Arrivals | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.arrivals = arrivals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _NO_BODY:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._reject(scope, receive, send, declared)
            return
        chunks: list[bytes] = []
        size = 0
        deadline = scope.get(ARRIVED_KEY, time.monotonic()) + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await self._too_slow(scope, receive, send, size)
                return
            if message["type"] == "http.disconnect":
                scope[ERROR_TYPE_KEY] = "client_disconnected"  # counted as 499, not as a server error
                return  # client left before sending its body: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._reject(scope, receive, send, size)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if self.arrivals is not None and is_scoring_path(scope.get("path", "")):
            self.arrivals.begin(scope)  # the body is in: from here until queued, it is truly arriving
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_slow(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        scope[ERROR_TYPE_KEY] = "request_timeout"
        response = error_response(
            408,
            "request_timeout",
            f"request body not received within body_timeout_s={self.body_timeout_s:g}s "
            f"({size} bytes arrived)",
            field="body",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        scope[ERROR_TYPE_KEY] = "payload_too_large"
        response = error_response(
            413,
            "payload_too_large",
            f"request body of {size}+ bytes is over max_body_bytes={self.max_body_bytes}",
            field="body",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
