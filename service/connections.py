"""Connection-level guards uvicorn lacks: a deadline on the request head, and a connection limit that
answers in the documented error shape.

An outside attack found that uvicorn (h11 and httptools alike) has no timeout before a request's
head is complete: the body deadline (service/middleware.py) only starts once the app sees a request,
so 20 sockets that sent nothing, and 20 that trickled header lines, were still open after 45 s, and
with `HYDRA_RM_MAX_CONNECTIONS=50` fifty of them turned every legitimate request away. uvicorn's own
limit also counts every open socket at the moment a head completes, so a flood past the limit refused
everyone (none of the first 50 served), and with a plain-text `Service Unavailable` and no Retry-After.

`guarded_protocol` wraps uvicorn's protocol class (already reshaped by service/http_errors.py):

- head timeout: from a connection's first moment, and from the first byte of each later request on
  a kept-alive connection, the head (request line and headers) must be complete within
  `head_timeout_s`; otherwise the client gets 408 `request_timeout` and the connection is closed.
  A connection idle between requests is still closed by uvicorn's keep-alive timer, silently.
- connection limit: a connection takes one of `max_connections` slots when its first request head is
  complete and keeps it until it closes, first come first served. A request on a connection that
  finds no slot gets 503 `overloaded` with Retry-After and `Connection: close`. Sockets that have not
  sent a head hold no slot (the head timeout bounds them), so they cannot lock legitimate clients out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import error_response


def head_timeout_response(head_timeout_s: float) -> bytes:
    body = json.dumps(
        {
            "error": {
                "type": "request_timeout",
                "message": f"request head not received within head_timeout_s={head_timeout_s:g}s; "
                "the connection is closed",
                "field": "headers",
            }
        }
    ).encode()
    head = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode("ascii") + b"\r\nconnection: close\r\n\r\n"
    )
    return head + body


class _Admission:
    """The ASGI app a guarded connection runs its requests through: it holds the connection's slot."""

    def __init__(self, app: ASGIApp, protocol: Any) -> None:
        self.app = app
        self.protocol = protocol

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        proto = self.protocol
        slots: set[Any] = proto.slots
        if scope["type"] == "http" and proto not in slots:
            if len(slots) >= proto.max_connections:
                proto.count("overloaded")
                response = error_response(
                    503,
                    "overloaded",
                    f"the server holds max_connections={proto.max_connections} connections; retry",
                    headers={"Retry-After": str(proto.retry_after_s), "Connection": "close"},
                )
                await response(scope, receive, send)
                return
            slots.add(proto)
        await self.app(scope, receive, send)


def guarded_protocol(
    base: type,
    *,
    head_timeout_s: float,
    max_connections: int | None,
    retry_after_s: int,
    count: Callable[[str], None] = lambda reason: None,
) -> type:
    """A subclass of uvicorn's protocol class `base` with the head timeout and the connection slots.
    `count(reason)` is told of each request answered here (the app's metrics never see them)."""
    slots: set[Any] = set()  # shared by this server's connections

    class GuardedProtocol(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.head_timeout_s = head_timeout_s
            self.max_connections = max_connections if max_connections is not None else float("inf")
            self.retry_after_s = retry_after_s
            self.slots = slots
            self.count = count
            self._head_timer: asyncio.TimerHandle | None = None
            self.limit_concurrency = None  # uvicorn's own check counted idle sockets; ours is _Admission
            self.app = _Admission(self.app, self)

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            self.slots.discard(self)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and self._between_requests():
                self._arm_head_timer()  # a new request on a kept-alive connection: its head's deadline
            super().data_received(data)
            if not self._between_requests():
                self._cancel_head_timer()  # the head is complete: the body deadline takes over

        def _between_requests(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is None or cycle.response_complete

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self._between_requests() or self.transport is None or self.transport.is_closing():
                return
            self.count("request_timeout")
            self.transport.write(head_timeout_response(self.head_timeout_s))
            self.transport.close()

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol
