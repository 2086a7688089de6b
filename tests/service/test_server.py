"""`hydra-rm serve` as a real process: SIGTERM stops accepting, finishes what is queued, exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from scoring.engine import Item
from tests.service.conftest import metric_value, wait_until

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    tmp_path: Path, *args: str, port: int | None = None, ready_timeout_s: float = 90, **env_vars: str
):
    """`hydra-rm serve` as a real process (store under tmp_path), ready when /readyz says so; a given
    `port` lets a test bring a killed replica back where it was."""
    port = port or _free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HYDRA_RM_STORE_ROOT=str(tmp_path / "store"),
        HYDRA_RM_LOG_LEVEL="warning",
        **env_vars,
    )
    cmd = [sys.executable, "-m", "cli", "serve", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read().decode()}")
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=ready_timeout_s, what="the server to be ready")
    return proc, url


@pytest.fixture()
def served_process(tiny_llama_dir, tmp_path):
    # One item per forward: a second of queued work, so requests are surely in flight at SIGTERM.
    env = {"HYDRA_RM_TOKEN_BUDGET": "64", "HYDRA_RM_MAX_BATCH_SIZE": "1", "HYDRA_RM_DRAIN_TIMEOUT_S": "120"}
    proc, url = start_server(tmp_path, "--model", str(tiny_llama_dir), **env)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_drains_in_flight_requests_then_exits_cleanly(served_process, tiny_engine, sig):
    """SIGHUP (a closed terminal, some supervisors' "reload") drains exactly as SIGTERM does: before,
    it killed the process on the spot (of 300 in-flight requests 271 got no answer, exit 129)."""
    proc, url = served_process
    groups = [
        [f"request {i} item {j} " + "lorem ipsum dolor sit amet " * 20 for j in range(32)] for i in range(8)
    ]
    results: dict[int, httpx.Response] = {}

    def call(i: int) -> None:
        body = {"items": [{"text": t} for t in groups[i]]}
        results[i] = httpx.post(f"{url}/v1/score", json=body, timeout=120)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    in_flight_at_sigterm = 0.0

    def all_received() -> bool:
        nonlocal in_flight_at_sigterm
        text = httpx.get(f"{url}/metrics", timeout=5).text
        in_flight_at_sigterm = metric_value(text, "hydra_rm_requests_in_flight", {"endpoint": "/v1/score"})
        answered = metric_value(text, "hydra_rm_requests_total", {"endpoint": "/v1/score"})
        return in_flight_at_sigterm + answered == 8

    wait_until(all_received, what="all 8 requests received")
    os.kill(proc.pid, sig)
    for t in threads:
        t.join(120)
    assert in_flight_at_sigterm >= 1  # the drain had work to finish
    assert proc.wait(timeout=60) == 0
    output = proc.stdout.read().decode()
    assert "Traceback" not in output
    expected = tiny_engine.score([Item(text=t) for t in groups[7]])
    for i in range(8):
        assert results[i].status_code == 200, results[i].text
        assert len(results[i].json()["results"]) == 32
    got = [r["reward"] for r in results[7].json()["results"]]
    assert got == pytest.approx([e.min for e in expected], abs=1e-5)
    with pytest.raises(httpx.ConnectError):  # it no longer accepts connections
        httpx.get(f"{url}/healthz", timeout=2)


def test_serve_refuses_a_bad_setting(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_RM_MAX_QUEUE_ITEMS="-3")
    out = subprocess.run(
        [sys.executable, "-m", "cli", "serve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "max_queue_items" in out.stderr


def test_serve_with_no_model_serves_the_embedded_default(tmp_path):
    proc, url = start_server(tmp_path)
    try:
        card = httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]
        scored = httpx.post(
            f"{url}/v1/score", json={"items": [{"prompt": "hi", "response": "hello"}]}, timeout=30
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert card["id"] == "hydra-default"
    assert card["head_names"] == [
        "review_sentiment_1",
        "review_sentiment_2",
        "review_sentiment_3",
        "review_sentiment_4",
    ]
    assert scored.status_code == 200
    body = scored.json()
    assert body["model"] == "hydra-default" and body["head_names"] == card["head_names"]
    result = body["results"][0]
    assert len(result["heads"]) == 4 and result["reward"] == min(result["heads"].values())  # default: min
    assert result["tokens"] > 2 and body["usage"]["tokens"] == result["tokens"]


def test_draining_turns_readiness_off_but_still_answers(tiny_engine):
    from scoring.settings import Settings
    from tests.service.conftest import live_server

    with live_server(Settings(), tiny_engine) as live, live.client() as c:
        assert c.get("/readyz").status_code == 200
        live.service.begin_drain()  # what SIGTERM calls, from the signal handler
        wait_until(lambda: c.get("/readyz").status_code == 503, what="readiness to turn off")
        assert c.get("/readyz").json()["status"] == "draining"
        assert c.get("/healthz").status_code == 200
        assert c.post("/get_reward", json={"query": ["already connected"]}).status_code == 200
        assert metric_value(c.get("/metrics").text, "hydra_rm_ready") == 0
