"""Running the app under uvicorn, with a SIGTERM that drains instead of dropping work.

On SIGTERM uvicorn stops listening and waits for in-flight requests (up to drain_timeout_s);
we add two things: part-full batches flush at once (nobody else is coming), /readyz turns 503,
and after a clean drain the process exits 0 instead of re-raising the signal.
"""

from __future__ import annotations

import copy
import signal
import socket
from types import FrameType
from typing import Any

import uvicorn

from service.settings import Settings


class HydraServer(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        app = self.config.loaded_app if self.config.loaded else None
        service = _find_service(app)
        if service is not None:
            service.begin_drain()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if not self.force_exit:
            # We honoured SIGTERM by draining; uvicorn would re-raise it at exit (status -15).
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured[:] = [s for s in captured if s != signal.SIGTERM]


def _find_service(app: Any) -> Any:
    # uvicorn wraps the app in proxy middleware; walk `.app` links down to FastAPI.
    for _ in range(8):
        if app is None:
            return None
        state = getattr(app, "state", None)
        if state is not None and getattr(state, "service", None) is not None:
            return state.service
        app = getattr(app, "app", None)
    return None


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
    build_server(settings).run()
