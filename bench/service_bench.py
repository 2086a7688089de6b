"""Service throughput: hydra-rm vs a per-request server vs the raw engine, one model, one workload.

- hydra-rm: the real service (`python -m cli serve`), cross-request dynamic batching.
- per-request: what most RL teams hand-roll (OpenRLHF's own serve_rm has this shape): an async
  FastAPI handler that runs one forward per HTTP request, padded to the request's longest item,
  no batching across requests.
- raw engine: `engine.score(all items)` in-process (length-sorted batches under the token budget):
  the best schedule with no HTTP at all, i.e. the ceiling.

Two request shapes over the same items: OpenRLHF's one sample per `/get_reward` request, and
GRPO-style groups of 8 items per request (`/v1/score`). Closed-loop clients (httpx, one process)
at 1, 8, 32 and 128 concurrent clients (a minimal asyncio HTTP/1.1 client, so the load generator
is not what is measured). Servers run in their own processes on the same machine as the clients.

Usage: `python bench/service_bench.py [--items 480] [--hidden 256] [--layers 4]`; writes
bench/results/service-<device>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = (
    "the reward model scores each response to a prompt and several linear heads share one encoder so the "
    "policy receives the minimum which resists over optimisation of a flawed proxy while disagreement "
    "between heads measures uncertainty about quality helpfulness and harm"
).split()
CONCURRENCY = (1, 8, 32, 128)
GROUP = 8


def workload(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, response) pairs: prompts of 5-40 words, responses of 10-200 words, seeded."""
    rng = random.Random(seed)
    return [
        (
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))),
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 200))),
        )
        for _ in range(n)
    ]


# -- the per-request server ------------------------------------------------------------------------
def per_request_app(model_dir: str) -> Any:
    """One forward per HTTP request on the event loop, like OpenRLHF's serve_rm."""
    from fastapi import FastAPI

    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from scoring.engine import Item, ScoringEngine

    rm = load_reward_model(model_dir, ModelStore(Path(tempfile.mkdtemp()) / "store"))
    engine = ScoringEngine(rm)
    engine.warmup()
    app = FastAPI()

    # forward_padded: one plain padded pass per request, as a hand-rolled server does (engine.forward
    # would bring hydra-rm's own padding cap and prefix sharing into the baseline).
    @app.post("/get_reward")
    async def get_reward(body: dict) -> dict:
        scores = engine.forward_padded([engine.encode(Item(text=q)) for q in body["query"]])
        return {"rewards": [s.min for s in scores]}

    @app.post("/v1/score")
    async def score(body: dict) -> dict:
        scores = engine.forward_padded([engine.encode(Item(**it)) for it in body["items"]])
        return {"results": [{"reward": s.min, "heads": s.rewards} for s in scores]}

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    return app


def serve_per_request(model_dir: str, port: int) -> None:
    import uvicorn

    uvicorn.run(
        per_request_app(model_dir), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )


# -- load generation -------------------------------------------------------------------------------
@dataclass
class Result:
    items_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


class RawClient:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams.

    httpx costs about a millisecond of CPU per request; on a 2-core machine shared with the server
    the load generator would then be what is measured. This one costs a fraction of that.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        raw_head = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(v) for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-length"
        )
        payload = await self.reader.readexactly(length)
        if any(ln.lower() == "connection: close" for ln in lines):
            self.writer.close()
            self.writer = None
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def drive(url: str, path: str, bodies: list[dict], n_items: int, concurrency: int) -> Result:
    host, port = url.removeprefix("http://").split(":")
    encoded = [json.dumps(b).encode() for b in bodies]
    next_body = iter(encoded)
    latencies: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        client = RawClient(host, int(port))
        try:
            for body in next_body:  # a shared iterator: each body is sent once, by whoever is free
                t0 = time.perf_counter()
                status, _ = await client.post(path, body)
                latencies.append(time.perf_counter() - t0)
                errors += status != 200
        finally:
            client.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    latencies.sort()
    return Result(
        n_items / wall,
        1000 * latencies[len(latencies) // 2],
        1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        errors,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict[str, str], port: int, timeout_s: float = 180) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def stop(proc: subprocess.Popen, wait_s: float = 30) -> None:
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=480)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="runs per cell; the best is reported")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--serve-per-request", nargs=2, metavar=("MODEL_DIR", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_per_request:
        serve_per_request(args.serve_per_request[0], int(args.serve_per_request[1]))
        return

    import torch

    from model_store import ModelStore
    from model_store.default_model import build_default_model
    from model_store.loader import load_reward_model
    from scoring.engine import Item, ScoringEngine
    from scoring.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="hydra-service-bench-"))
    model_dir = build_default_model(tmp / "model", hidden_size=args.hidden, num_layers=args.layers)
    pairs = workload(args.items)
    texts = [f"{p}\n{r}" for p, r in pairs]  # what OpenRLHF sends: the full prompt+response text
    single = [
        {"query": [t], "prompts": [p], "labels": [None]} for t, (p, _) in zip(texts, pairs, strict=True)
    ]
    groups = [
        {"items": [{"prompt": p, "response": r} for p, r in pairs[i : i + GROUP]]}
        for i in range(0, len(pairs), GROUP)
    ]

    # The ceiling: the raw engine in-process, same items, same token budget as the service.
    settings = Settings()
    rm = load_reward_model(str(model_dir), ModelStore(tmp / "store"))
    # Without the padding cap, as this ceiling was measured before the cap existed.
    engine = ScoringEngine(rm, policy=replace(settings.batch_policy(), max_padding=float("inf")))
    engine.warmup()
    raw: dict[str, float] = {}
    for shape, items in (
        ("single", [Item(text=t) for t in texts]),
        ("group", [Item(prompt=p, response=r) for p, r in pairs]),
    ):
        runs = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            engine.score(items)
            runs.append(len(items) / (time.perf_counter() - t0))
        raw[shape] = max(runs)
        print(f"raw engine ({shape}): {raw[shape]:.1f} items/s", flush=True)
    lengths = [e.n_tokens for e in (engine.encode(Item(text=t)) for t in texts)]
    del engine, rm

    env = dict(
        os.environ, PYTHONPATH=str(ROOT), HYDRA_RM_STORE_ROOT=str(tmp / "store"), HYDRA_RM_LOG_LEVEL="warning"
    )
    commands = {
        "hydra-rm": lambda port: (
            [sys.executable, "-m", "cli", "serve", "--model", str(model_dir)] + ["--port", str(port)]
        ),
        "per-request": lambda port: [
            sys.executable,
            __file__,
            "--serve-per-request",
            str(model_dir),
            str(port),
        ],
    }
    # Both servers stay up (an idle one costs nothing) and runs alternate between them, so drift in
    # the machine's load hits both alike; each cell is the best of --repeats runs.
    urls, procs = {}, []
    try:
        for name, cmd in commands.items():
            port = free_port()
            procs.append(start(cmd(port), env, port))
            urls[name] = f"http://127.0.0.1:{port}"
        results: dict[tuple[str, str, int], Result] = {}
        for shape, path, bodies in (("single", "/get_reward", single), ("group", "/v1/score", groups)):
            for url in urls.values():  # warm-up
                asyncio.run(drive(url, path, bodies[:8], 8, 4))
            for c in CONCURRENCY:
                for _ in range(args.repeats):
                    for name, url in urls.items():
                        res = asyncio.run(drive(url, path, bodies, len(pairs), c))
                        best = results.get((name, shape, c))
                        if best is None or res.items_per_s > best.items_per_s:
                            results[(name, shape, c)] = res
                        print(
                            f"{name:12s} {shape:6s} c={c:<4d} {res.items_per_s:7.1f} items/s  "
                            f"p50 {res.p50_ms:7.1f} ms  p99 {res.p99_ms:7.1f} ms  errors {res.errors}",
                            flush=True,
                        )
    finally:
        for proc in procs:
            stop(proc)

    device = (
        "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name().replace(" ", "-").lower()
    )
    out = args.out or ROOT / "bench" / "results" / f"service-{device}.md"
    write_report(out, args, device, raw, results, lengths, torch.__version__, torch.get_num_threads())
    print(f"wrote {out}")


def write_report(
    out: Path,
    args: argparse.Namespace,
    device: str,
    raw: dict[str, float],
    results: dict[tuple[str, str, int], Any],
    lengths: list[int],
    torch_version: str,
    threads: int,
) -> None:
    lines = [
        f"# Service throughput ({device})",
        "",
        f"Command: `python bench/service_bench.py --items {args.items} --hidden {args.hidden} "
        f"--layers {args.layers} --repeats {args.repeats}`  ",
        f"Model: Llama-style decoder (the embedded default's recipe), hidden {args.hidden}, {args.layers} layers, "
        f"K=4 heads, fp32. Workload: {args.items} prompt+response items of 15-240 words, "
        f"{min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}), seeded. "
        f"torch {torch_version}, {threads} threads, {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}; the clients (one asyncio process) share the machine.",
        "",
        f"Closed-loop clients; items/s over the whole run, best of {args.repeats} runs alternating between the "
        "servers (the machine is shared, so runs drift); latency per HTTP request, from that run. "
        "`single` = one sample per "
        f"`/get_reward` request (OpenRLHF); `group` = {GROUP} items per `/v1/score` request (a GRPO group). "
        "Raw engine = `engine.score(all items)` in-process (sorted batches under the same token budget), "
        f"best of {args.repeats + 1}.",
        "",
    ]
    for shape in ("single", "group"):
        lines += [
            f"## {shape}: raw engine {raw[shape]:.1f} items/s",
            "",
            "| clients | hydra-rm items/s | p50 ms | p99 ms | per-request items/s | p50 ms | p99 ms "
            "| hydra / per-request | hydra / raw engine |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in CONCURRENCY:
            h, p = results[("hydra-rm", shape, c)], results[("per-request", shape, c)]
            err = f" ({h.errors}+{p.errors} errors)" if h.errors or p.errors else ""
            lines.append(
                f"| {c}{err} | {h.items_per_s:.1f} | {h.p50_ms:.0f} | {h.p99_ms:.0f} | {p.items_per_s:.1f} | "
                f"{p.p50_ms:.0f} | {p.p99_ms:.0f} | {h.items_per_s / p.items_per_s:.2f}x | "
                f"{h.items_per_s / raw[shape]:.2f}x |"
            )
        lines.append("")
    lines += ["## Goals (reported, not asserted)", ""]
    for shape in ("single", "group"):
        vs_per = (
            results[("hydra-rm", shape, 32)].items_per_s / results[("per-request", shape, 32)].items_per_s
        )
        vs_raw = results[("hydra-rm", shape, 128)].items_per_s / raw[shape]
        lines.append(
            f"- {shape}: hydra-rm / per-request at 32 clients = {vs_per:.2f}x (goal >= 3x: "
            f"{'met' if vs_per >= 3 else 'not met'}); hydra-rm / raw engine at 128 clients = {vs_raw:.2f}x "
            f"(goal >= 0.9x: {'met' if vs_raw >= 0.9 else 'not met'})."
        )
    if device == "cpu":
        lines += [
            "",
            "Why the 3x goal is out of reach on this CPU: compute here is linear in padded tokens, so a batch "
            "buys almost nothing over one item at a time (bench/results/engine-cpu.md: one at a time "
            "~73 items/s, the best sorted schedule ~78). A per-request server fed OpenRLHF's one-sample "
            "requests has nothing to pad and runs one item at a time, which is already as fast as any "
            "batched schedule: cross-request batching can match it here, not beat it. What batching across "
            "requests wins on CPU is padding: with several items per request the per-request server pads "
            "them together (`group`), while hydra-rm sorts items across requests and caps padding. The large "
            "factors belong to GPUs, where a forward of 64 items costs about what one costs.",
        ]
    lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
