"""What happens to requests that a SIGTERM drain cannot finish within HYDRA_RM_DRAIN_TIMEOUT_S.

An outside attack found that with 1,000-1,500 requests queued and a 2-3 s drain, uvicorn cancelled
the unfinished request tasks at the deadline: 713-1,174 clients got uvicorn's plain-text 500 (no error
body, no Retry-After), the log got a CancelledError traceback per request, and the process exited 0.
OpenRLHF retries a failed sample 5 times, 1 s apart, so these requests must say "retry elsewhere":

- shortly before the deadline the server *cuts* the drain: everything still queued is failed with
  `ShuttingDown` (503 `shutting_down` + Retry-After, through the normal error handlers and metrics);
- `DrainGuard`, outermost, answers the same 503 for any request uvicorn still has to cancel at the
  deadline (one still sending its body, say) instead of letting it become a 500;
- the process exits with `EXIT_DRAIN_CUT_SHORT` instead of 0, so an orchestrator can tell.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Overloaded, error_response

log = logging.getLogger("hydra_rm.drain")

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry". Unfinished requests
# got 503 + Retry-After; 0 would tell the orchestrator every accepted request was answered.
EXIT_DRAIN_CUT_SHORT = 75


def cut_margin_s(drain_timeout_s: float) -> float:
    """How long before the drain deadline the queue is cut, leaving time to write the 503s
    (1,500 of them are a few tens of milliseconds of event-loop work here)."""
    return min(1.0, 0.25 * drain_timeout_s)


class ShuttingDown(Overloaded):
    """The server is stopping and will not score this request; another replica can. A kind of
    Overloaded (503 + Retry-After) so that callers handling that keep working."""

    status, type = 503, "shutting_down"


class DrainGuard:
    """Outermost ASGI wrapper: a request cancelled because the drain deadline passed gets the
    documented 503 instead of uvicorn's plain-text 500 and a traceback."""

    def __init__(self, app: ASGIApp, shutting_down: Callable[[], bool], retry_after_s: int = 1) -> None:
        self.app = app
        self.shutting_down = shutting_down
        self.retry_after_s = retry_after_s
        self.cut_short = 0  # requests cancelled by the server's shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except asyncio.CancelledError:
            if not self.shutting_down():
                raise  # not ours to handle
            # uvicorn cancels each request task once, at the deadline, and then stops waiting for it:
            # answering and returning normally ends the task cleanly.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            self.cut_short += 1
            if started:  # half an answer is already out: nothing valid can follow, the connection closes
                return
            response = error_response(
                503,
                ShuttingDown.type,
                "the server shut down before this request was scored (drain timeout); retry",
                headers={"Retry-After": str(self.retry_after_s), "Connection": "close"},
            )
            await response(scope, receive, send)
