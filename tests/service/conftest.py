"""Live-server fixtures: real uvicorn on 127.0.0.1 (a free port), in a thread, around a tiny model."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from scoring.engine import Item
from scoring.settings import Settings
from service.app import create_app
from service.server import HydraServer


@dataclass
class Live:
    url: str
    app: Any
    server: HydraServer

    @property
    def service(self) -> Any:
        return self.app.state.service

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30.0), **kwargs)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return metric_value(httpx.get(f"{self.url}/metrics").text, name, labels)


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, label_text = head.partition("{")
        if series != name:
            continue
        if labels and not all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            continue
        total += float(value)
    return total


@contextmanager
def live_server(settings: Settings | None = None, engine: Any = None, port: int = 0) -> Iterator[Live]:
    """A real uvicorn server in a thread; `port` 0 picks a free one (a given port lets a test bring a
    replica back where it was)."""
    settings = settings or Settings()
    app = create_app(settings, engine=engine)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=5,
        limit_concurrency=settings.max_connections,  # as service.server.build_server
    )
    server = HydraServer(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server failed to start")
        time.sleep(0.01)
    try:
        yield Live(f"http://127.0.0.1:{port}", app, server)
    finally:
        server.should_exit = True
        thread.join(30)


class ControlledEngine:
    """A real engine with test seams: hold forwards at a gate, poison texts, record what ran.

    Everything not overridden is delegated, so the app sees a normal ScoringEngine.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.poisoned: set[tuple[int, ...]] = set()
        self.forwarded: list[tuple[int, ...]] = []
        self.batches: list[int] = []
        self.calls = 0
        self.failed_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def ids(self, text: str) -> tuple[int, ...]:
        return tuple(self._inner.encode(Item(text=text)).input_ids)

    def poison(self, text: str) -> None:
        self.poisoned.add(self.ids(text))

    def forward(self, batch: Sequence[Any]) -> list[Any]:
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(timeout=60), "test gate never opened"
        keys = [tuple(e.input_ids) for e in batch]
        if self.poisoned.intersection(keys):
            self.failed_calls += 1
            raise RuntimeError("poisoned item in batch (test hook)")
        self.forwarded.extend(keys)
        self.batches.append(len(batch))
        return self._inner.forward(batch)


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture()
def controlled(tiny_engine: Any) -> ControlledEngine:
    return ControlledEngine(tiny_engine)


@pytest.fixture(scope="module")
def live(tiny_engine: Any) -> Iterator[Live]:
    """One default server for the read-mostly tests of a module (small limits, to test them)."""
    settings = Settings(max_items_per_request=64, max_body_bytes=64 * 1024)
    with live_server(settings, tiny_engine) as server:
        yield server
