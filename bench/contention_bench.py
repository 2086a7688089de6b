"""What a small neighbour costs the forward: the in-process engine alone vs beside a thread or a process
that is busy a few per cent of one core (like the service's event loop: parse, tokenize, plan, answer).

Torch's intra-op OpenMP threads wait for each other at every op, so a neighbour that takes a core for
a millisecond stalls both. The question behind it: would moving the engine into a process of its own
(no GIL shared with the event loop) win anything? If a neighbour process costs what a neighbour thread
does, no.

Also: one-item forwards with one OpenMP pool in the process vs two (the model loaded on another thread).

Usage: `python bench/contention_bench.py [--rounds 5] [--busy-ms 1] [--period-ms 22]`; writes
bench/results/contention-<device>.md. Model and items: bench/ceiling_bench.py's (Qwen2-style, hidden
256, 4 layers, 416 items of 1-4 text requests), pre-tokenized, `engine.score_encoded`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def burn(stop: Any, busy_s: float, idle_s: float) -> None:
    """Spin for `busy_s`, sleep `idle_s`, until `stop` (a threading or multiprocessing Event) is set."""
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < busy_s:
            pass
        time.sleep(idle_s)


def _pools_child(split: bool, queue: Any) -> None:
    """In a fresh process: one-item forwards on a worker thread, the model loaded on that same thread
    (one OpenMP pool) or on the main thread (`split`: two pools, as the server had before)."""
    from concurrent.futures import ThreadPoolExecutor

    from bench.ceiling_bench import build_qwen2, requests
    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from model_store.tokenization import Item
    from scoring.engine import ScoringEngine

    tmp = Path(tempfile.mkdtemp(prefix="hydra-pools-"))
    model_dir = build_qwen2(tmp / "model")
    worker = ThreadPoolExecutor(1)

    def load() -> ScoringEngine:
        engine = ScoringEngine(load_reward_model(str(model_dir), ModelStore(tmp / "store")))
        engine.warmup()
        return engine

    engine = load() if split else worker.submit(load).result()
    encoded = [engine.encode(Item(text=t)) for r in requests(40) for t in r]

    def run() -> float:
        t0 = time.perf_counter()
        for e in encoded:
            engine.forward([e])
        return len(encoded) / (time.perf_counter() - t0)

    queue.put([worker.submit(run).result() for _ in range(3)])


def pools(rounds: int) -> list[dict[str, float]]:
    """Median items/s of one-item forwards, one pool vs two, each in a fresh process, alternating."""
    ctx = mp.get_context("spawn")
    rows = []
    for i in range(rounds):
        row = {}
        for split in (False, True) if i % 2 == 0 else (True, False):
            queue = ctx.Queue()
            proc = ctx.Process(target=_pools_child, args=(split, queue))
            proc.start()
            row["two pools" if split else "one pool"] = statistics.median(queue.get(timeout=600))
            proc.join()
        rows.append(row)
        print(f"pools round {i}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--busy-ms", type=float, default=1.0)
    ap.add_argument("--period-ms", type=float, default=22.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from bench.ceiling_bench import build_qwen2, requests
    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from model_store.tokenization import Item
    from scoring.engine import ScoringEngine
    from scoring.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="hydra-contention-"))
    model_dir = build_qwen2(tmp / "model")
    engine = ScoringEngine(
        load_reward_model(str(model_dir), ModelStore(tmp / "store")), policy=Settings().batch_policy()
    )
    engine.warmup()
    encoded = [engine.encode(Item(text=t)) for r in requests(160) for t in r]
    busy, idle = args.busy_ms / 1000, (args.period_ms - args.busy_ms) / 1000

    def run() -> float:
        t0 = time.perf_counter()
        engine.score_encoded(encoded)
        return len(encoded) / (time.perf_counter() - t0)

    def beside(kind: str) -> float:
        if kind == "alone":
            return run()
        if kind == "thread":
            stop: Any = threading.Event()
            neighbour: Any = threading.Thread(target=burn, args=(stop, busy, idle), daemon=True)
        else:
            ctx = mp.get_context("fork")
            stop = ctx.Event()
            neighbour = ctx.Process(target=burn, args=(stop, busy, idle), daemon=True)
        neighbour.start()
        try:
            return run()
        finally:
            stop.set()
            neighbour.join()

    rows: list[dict[str, float]] = []
    for i in range(args.rounds):
        row: dict[str, float] = {}
        kinds = ["alone", "thread", "process"]
        for kind in kinds[i % 3 :] + kinds[: i % 3]:  # the order rotates, so drift hits all three
            row[kind] = beside(kind)
        rows.append(row)
        print(f"round {i}: " + ", ".join(f"{k} {row[k]:.1f}" for k in kinds) + " items/s", flush=True)
    device = (
        "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name().replace(" ", "-").lower()
    )
    out = args.out or ROOT / "bench" / "results" / f"contention-{device}.md"
    duty = 100 * args.busy_ms / args.period_ms
    lines = [
        f"# A small neighbour vs the forward ({device})",
        "",
        f"Command: `python bench/contention_bench.py --rounds {args.rounds} --busy-ms {args.busy_ms} "
        f"--period-ms {args.period_ms}`  ",
        f"`engine.score_encoded` on {len(encoded)} pre-tokenized items, the three runs of a round in rotating order (bench/ceiling_bench.py's model and "
        f"workload), torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} "
        f"cores, {platform.processor() or platform.machine()}. Neighbour: spins {args.busy_ms} ms every "
        f"{args.period_ms} ms ({duty:.1f}% of one core), as a thread of this process or as a process of its own.",
        "",
        "| round | alone items/s | beside a thread | beside a process | thread / alone | process / alone |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows):
        lines.append(
            f"| {i} | {r['alone']:.1f} | {r['thread']:.1f} | {r['process']:.1f} | "
            f"{r['thread'] / r['alone']:.3f} | {r['process'] / r['alone']:.3f} |"
        )
    pool_rows = pools(args.rounds)
    med_t = statistics.median(r["thread"] / r["alone"] for r in rows)
    med_p = statistics.median(r["process"] / r["alone"] for r in rows)
    lines += [
        "",
        f"Median: beside a thread **{med_t:.3f}x**, beside a process **{med_p:.3f}x** of alone.",
        "",
        "## One OpenMP pool or two",
        "",
        "One-item forwards (the first 40 requests' items) on a worker thread, each variant in a fresh "
        "process: the model loaded and warmed up on that same thread (`one pool`), or on the main thread "
        "(`two pools`: torch work on a second thread gives it a pool of its own; libgomp then counts more "
        "threads than cores and throttles the spin-wait, so each op's threads sleep and wake). This is "
        "why the server loads, warms up and runs its model on its one forward thread.",
        "",
        "| round | one pool items/s | two pools items/s | two / one |",
        "|---:|---:|---:|---:|",
        *(
            f"| {i} | {r['one pool']:.1f} | {r['two pools']:.1f} | {r['two pools'] / r['one pool']:.3f} |"
            for i, r in enumerate(pool_rows)
        ),
        "",
        f"Median two / one: **{statistics.median(r['two pools'] / r['one pool'] for r in pool_rows):.3f}x**.",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
