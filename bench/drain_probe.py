"""SIGTERM under a burst with a short drain: how many requests were scored, refused (503
`shutting_down`) or broken (500, errors), and the exit code. Behaviour, not speed: it reproduces
issue 9's item 3 (before the fix: plain-text 500s, a traceback each, exit 0).

    .venv/bin/python bench/drain_probe.py --requests 1000 --drain 2   # writes bench/results/drain-cpu.md
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.builders import build_tiny_llama  # noqa: E402
from tests.service.test_server import start_server  # noqa: E402


def _outcome(r: object) -> str:
    if isinstance(r, httpx.Response):
        kind = (
            r.json()["error"]["type"]
            if r.headers.get("content-type") == "application/json" and r.status_code >= 400
            else ""
        )
        return f"{r.status_code} {r.headers.get('content-type', '')} {kind}".strip()
    return type(r).__name__


async def _burst(url: str, pid: int, n: int, wait_s: float) -> tuple[collections.Counter[str], float]:
    long_text = "lorem ipsum dolor sit amet " * 20
    bodies = [{"items": [{"text": f"big {i}.{j} {long_text}"} for j in range(32)]} for i in range(16)]
    bodies += [{"items": [{"text": f"small request {i}: the cat sat on the mat"}]} for i in range(n)]
    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        tasks = [asyncio.ensure_future(client.post("/v1/score", json=b)) for b in bodies]
        await asyncio.sleep(wait_s)
        os.kill(pid, signal.SIGTERM)
        start = time.monotonic()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    return collections.Counter(map(_outcome, results)), time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="one-item requests, beside 16 of 32 items")
    parser.add_argument("--drain", type=float, default=2.0, help="HYDRA_RM_DRAIN_TIMEOUT_S")
    parser.add_argument("--wait", type=float, default=6.0, help="seconds between the burst and SIGTERM")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "drain-cpu.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_llama(Path(tmp) / "model")
        env = {
            "HYDRA_RM_TOKEN_BUDGET": "64",
            "HYDRA_RM_MAX_BATCH_SIZE": "1",
            "HYDRA_RM_DRAIN_TIMEOUT_S": str(args.drain),
        }
        proc, url = start_server(Path(tmp), "--model", str(model), **env)
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, b"")), daemon=True)
        reader.start()  # a server logging a traceback per request must not block on a full pipe
        outcomes, answered_s = asyncio.run(_burst(url, proc.pid, args.requests, args.wait))
        code = proc.wait(timeout=120)
        reader.join(10)
    log = b"".join(lines).decode(errors="replace")
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(outcomes.items()))
    report = (
        f"# SIGTERM drain cut short ({args.requests} one-item + 16 x 32-item requests, drain {args.drain:g} s)\n\n"
        f"`{' '.join(['.venv/bin/python', 'bench/drain_probe.py', *sys.argv[1:]])}` on a shared 2-core CPU "
        "(other jobs running); tiny Llama, one item per forward so the queue outlasts the drain.\n\n"
        f"| outcome | requests |\n|---|---|\n{rows}\n\n"
        f"- all answered {answered_s:.2f} s after SIGTERM; exit code {code}; "
        f"{log.count('Traceback')} tracebacks in the log\n"
    )
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
