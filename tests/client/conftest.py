"""Client tests run against real hydra-rm servers (tests/service/conftest.py's live uvicorn)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from model_store.aggregation import Aggregation
from model_store.tokenization import Item
from service.settings import Settings
from tests.service.conftest import Live, live_server

SPLIT_LIMIT = 16  # the module server's max_items_per_request: the client must discover and obey it


def texts(n: int, tag: str = "t") -> list[str]:
    """Distinct items of varied length, so a result at the wrong index cannot match by accident."""
    words = "the quick brown fox jumps over a lazy dog while reward heads disagree about it".split()
    return [f"{tag}{i}: " + " ".join(words[: 1 + (i * 7) % len(words)]) for i in range(n)]


def reference(engine: Any, items: Sequence[Any], aggregation: str = "min") -> list[dict[str, Any]]:
    """What the in-process engine says for the same items (the client must agree to 1e-5)."""
    agg = Aggregation.parse(aggregation, engine.num_heads, engine.manifest.uwo_lambda)
    out = []
    for s in engine.score([Item(text=it) if isinstance(it, str) else Item(**it) for it in items]):
        out.append({"reward": agg.apply(s), "heads": list(s.rewards)})
    return out


def assert_matches(results: Sequence[Any], expected: Sequence[dict[str, Any]], tol: float = 1e-5) -> None:
    assert len(results) == len(expected)
    for i, (r, e) in enumerate(zip(results, expected, strict=True)):
        assert r is not None, f"result {i} is None"
        assert abs(r.reward - e["reward"]) <= tol, (i, r.reward, e["reward"])
        assert max(abs(a - b) for a, b in zip(r.heads.values(), e["heads"], strict=True)) <= tol, i


@contextmanager
def live_on_port(port: int, settings: Settings, engine: Any) -> Iterator[Live]:
    """tests/service/conftest.py's live_server, on a given port (a replica coming back where it was)."""
    import socket
    import threading
    import time

    import uvicorn

    from service.app import create_app
    from service.server import HydraServer

    app = create_app(settings, engine=engine)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = HydraServer(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
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


@pytest.fixture(scope="module")
def server(tiny_engine: Any) -> Iterator[Live]:
    with live_server(Settings(max_items_per_request=SPLIT_LIMIT), tiny_engine) as live:
        yield live


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(model_dir: Any, store: Any, port: int, **env_vars: str) -> Any:
    """`hydra-rm serve` as a real process (so it can be SIGKILLed), ready when /readyz says so."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    from tests.service.conftest import wait_until

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), HYDRA_RM_STORE_ROOT=str(store), HYDRA_RM_LOG_LEVEL="warning")
    env.update(env_vars)
    cmd = [sys.executable, "-m", "service", "serve", "--port", str(port), "--model", str(model_dir)]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=90, what="the server to be ready")
    return proc
