"""Running the app under uvicorn, with a SIGTERM that drains instead of dropping work.

On SIGTERM uvicorn stops listening and waits for in-flight requests (up to drain_timeout_s);
we add: part-full batches flush at once (nobody else is coming), /readyz turns 503, and after a
clean drain the process exits 0 instead of re-raising the signal. A drain that cannot finish in
time answers what is left with 503 `shutting_down` and exits EXIT_DRAIN_CUT_SHORT (service/drain.py).
HTTP requests the parser rejects get the documented error body (service/http_errors.py).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import signal
import socket
import sys
from types import FrameType
from typing import Any

import uvicorn

from scoring.settings import Settings
from service.drain import EXIT_DRAIN_CUT_SHORT, DrainGuard, cut_margin_s
from service.http_errors import shaped_protocol

log = logging.getLogger("hydra_rm.server")


class HydraServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        if isinstance(config.http, str):
            config.http = shaped_protocol(config.http)  # type: ignore[assignment]
        super().__init__(config)
        self.guard: DrainGuard | None = None
        self.drain_cut_short = False  # some accepted request was answered 503 instead of scored

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        app = self.config.loaded_app if self.config.loaded else None
        service = _find_service(app)
        if service is not None:
            service.begin_drain()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.config.loaded and self.guard is None:  # connections pick up loaded_app when they open
            settings = _find_state(self.config.loaded_app, "settings")
            retry = getattr(settings, "retry_after_s", 1)
            self.guard = DrainGuard(self.config.loaded_app, lambda: self.should_exit, retry)
            self.config.loaded_app = self.guard
        await super().startup(sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        service = _find_service(self.config.loaded_app)
        timeout = self.config.timeout_graceful_shutdown
        cutter = None
        if service is not None and timeout is not None:
            delay = max(0.0, timeout - cut_margin_s(timeout))
            cutter = asyncio.get_running_loop().create_task(self._cut_drain_after(service, delay))
        try:
            await super().shutdown(sockets)
        finally:
            if cutter is not None:
                cutter.cancel()
        if self.guard is not None and self.guard.cut_short:
            self.drain_cut_short = True
            log.warning(
                "drain timeout: %d requests were still running at the deadline; answered 503 shutting_down",
                self.guard.cut_short,
            )
        if not self.force_exit:
            # We honoured SIGTERM by draining; uvicorn would re-raise it at exit (status -15).
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured[:] = [s for s in captured if s != signal.SIGTERM]

    async def _cut_drain_after(self, service: Any, delay: float) -> None:
        """Shortly before uvicorn's deadline, fail what is still queued with 503 shutting_down, so
        those requests are answered through the app (error body, Retry-After, metrics) rather than
        cancelled."""
        await asyncio.sleep(delay)
        if not self.server_state.tasks:
            return  # every request was answered
        requests = len(self.server_state.tasks)
        unscored = await service.cut_drain()
        self.drain_cut_short = True
        log.warning(
            "drain timeout (%.3gs): %d requests still running, %d queued items not scored; "
            "answering them 503 shutting_down",
            self.config.timeout_graceful_shutdown,
            requests,
            unscored,
        )


def _find_state(app: Any, name: str) -> Any:
    # uvicorn wraps the app in proxy middleware (and we in DrainGuard); walk `.app` links down to FastAPI.
    for _ in range(8):
        if app is None:
            return None
        state = getattr(app, "state", None)
        if state is not None and getattr(state, name, None) is not None:
            return getattr(state, name)
        app = getattr(app, "app", None)
    return None


def _find_service(app: Any) -> Any:
    return _find_state(app, "service")


def build_server(settings: Settings, app: Any | None = None, **overrides: Any) -> HydraServer:
    from service.app import create_app

    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["hydra_rm"] = {"handlers": ["default"], "level": settings.log_level.upper()}
    config = uvicorn.Config(
        app if app is not None else create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=log_config,
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.drain_timeout_s,  # type: ignore[arg-type]
        limit_concurrency=settings.max_connections,
        lifespan="on",
        **overrides,
    )
    return HydraServer(config)


def run(settings: Settings) -> None:
    """Serve until stopped; exit EXIT_DRAIN_CUT_SHORT when a drain had to refuse accepted requests."""
    server = build_server(settings)
    server.run()
    if server.drain_cut_short:
        sys.exit(EXIT_DRAIN_CUT_SHORT)
