"""hydra-rm from outside vs the same model and items in-process: how close the service gets to its ceiling.

The workload is OpenRLHF-shaped: each `/get_reward` request carries 1-4 full texts of 10-200 words
(seeded), sent by 32 closed-loop clients. The model is a Qwen2-style decoder (hidden 256, 4 layers,
K=4 heads, fp32, random weights). The ceiling is `engine.score(all items)` in the bench process,
length-sorted batches under the same 2,048-token budget, with and without the padding cap (the
faster counts). Runs alternate between ceiling and service so drift in the machine's load hits both;
the ratio is reported per pair and as the median.

Usage: `python bench/ceiling_bench.py [--requests 160] [--clients 8 32 128] [--pairs 3] [--env K=V ...]`;
writes bench/results/ceiling-<device>.md (`--out` to change). `--env` passes settings to the server
(for A/B of a setting, e.g. `--env HYDRA_RM_MAX_WAIT_MS=0`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.service_bench import WORDS, drive, free_port, start, stop  # noqa: E402


def requests(n: int, seed: int = 0) -> list[list[str]]:
    """`n` requests of 1-4 texts, each 10-200 words, seeded."""
    rng = random.Random(seed)
    return [
        [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 200))) for _ in range(rng.randint(1, 4))]
        for _ in range(n)
    ]


def build_qwen2(dest: Path, *, hidden: int = 256, layers: int = 4, k: int = 4, seed: int = 0) -> Path:
    """A random Qwen2-style reward model (RoPE, GQA, biased q/k/v) with the default's tokenizer."""
    from tests.builders import build_tiny_decoder

    return build_tiny_decoder(dest, "qwen2", hidden=hidden, layers=layers, k=k, max_positions=2048, seed=seed)


@dataclass
class Shape:
    """Where a run's time went: encoder batches, their padded and real tokens, the encoder's seconds."""

    wall_s: float
    batches: int
    padded: int
    real: int
    forward_s: float

    def describe(self) -> dict[str, float]:
        return {
            "batches": self.batches,
            "padding %": 100 * (1 - self.real / self.padded),
            "encoder s": self.forward_s,
            "wall s": self.wall_s,
            "encoder idle %": 100 * max(0.0, 1 - self.forward_s / self.wall_s),
            "us / padded token": 1e6 * self.forward_s / self.padded,
        }


BATCH_COUNTERS = frozenset(
    {
        "hydra_rm_batch_size_count",
        "hydra_rm_batch_tokens_sum",
        "hydra_rm_tokens_total",
        "hydra_rm_inference_seconds_sum",
    }
)


def scrape(url: str, wanted: frozenset[str] = BATCH_COUNTERS) -> dict[str, float]:
    """The counters this bench reads from a server's /metrics (a name's samples summed over labels)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--pairs", type=int, default=3, help="ceiling/service run pairs")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--env", nargs="*", default=[], help="KEY=VALUE settings for the server")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from model_store.tokenization import Item
    from scoring.engine import ScoringEngine
    from scoring.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="hydra-ceiling-"))
    model_dir = build_qwen2(tmp / "model", hidden=args.hidden, layers=args.layers)
    reqs = requests(args.requests)
    texts = [t for r in reqs for t in r]
    bodies = [{"query": r, "prompts": [""] * len(r), "labels": [None] * len(r)} for r in reqs]

    policy = Settings().batch_policy()
    rm = load_reward_model(str(model_dir), ModelStore(tmp / "store"))
    engines = {
        "capped": ScoringEngine(rm, policy=policy),
        "uncapped": ScoringEngine(rm, policy=replace(policy, max_padding=float("inf"))),
    }
    items = [Item(text=t) for t in texts]
    engines["capped"].warmup()
    lengths = [e.n_tokens for e in map(engines["capped"].encode, items)]

    record: list[tuple[int, int, int, float]] = []  # (items, padded, real, seconds) per batch

    def recorded(forward: Any) -> Any:
        def wrapped(batch: Any) -> Any:
            t0 = time.perf_counter()
            out = forward(batch)
            n = [e.n_tokens for e in batch]
            record.append((len(n), max(n) * len(n), sum(n), time.perf_counter() - t0))
            return out

        return wrapped

    for engine in engines.values():
        engine.forward = recorded(engine.forward)  # type: ignore[method-assign]
    inprocess: dict[str, Shape] = {}

    def ceiling() -> dict[str, float]:
        out = {}
        for name, engine in engines.items():
            record.clear()
            t0 = time.perf_counter()
            engine.score(items)
            wall = time.perf_counter() - t0
            out[name] = len(items) / wall
            inprocess[name] = Shape(
                wall,
                len(record),
                sum(r[1] for r in record),
                sum(r[2] for r in record),
                sum(r[3] for r in record),
            )
        return out

    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HYDRA_RM_STORE_ROOT=str(tmp / "store"),
        HYDRA_RM_LOG_LEVEL="warning",
        **dict(kv.split("=", 1) for kv in args.env),
    )
    port = free_port()
    proc = start(
        [sys.executable, "-m", "cli", "serve", "--model", str(model_dir), "--port", str(port)], env, port
    )
    url = f"http://127.0.0.1:{port}"
    rows: list[tuple[int, dict[str, float], Any, float]] = []
    shapes: list[tuple[int, Shape, Shape]] = []  # (clients, in-process best, service)
    try:
        asyncio.run(drive(url, "/get_reward", bodies[:16], 16, 4))  # warm-up
        ceiling()
        for i in range(args.pairs):
            for clients in args.clients:
                ceil = ceiling()
                best = inprocess[max(ceil, key=lambda k: ceil[k])]
                before = scrape(url)
                res = asyncio.run(drive(url, "/get_reward", bodies, len(texts), clients))
                after = {k: v - before.get(k, 0.0) for k, v in scrape(url).items()}
                served = Shape(
                    len(texts) / res.items_per_s,
                    int(after["hydra_rm_batch_size_count"]),
                    int(after["hydra_rm_batch_tokens_sum"]),
                    int(after["hydra_rm_tokens_total"]),
                    after["hydra_rm_inference_seconds_sum"],
                )
                shapes.append((clients, best, served))
                rows.append((clients, ceil, res, res.items_per_s / max(ceil.values())))
                print(
                    f"pair {i} clients {clients}: ceiling capped {ceil['capped']:.1f} uncapped "
                    f"{ceil['uncapped']:.1f} items/s; service {res.items_per_s:.1f} items/s (p50 {res.p50_ms:.0f} "
                    f"ms, errors {res.errors}); ratio {rows[-1][3]:.3f}",
                    flush=True,
                )
    finally:
        stop(proc)

    device = (
        "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name().replace(" ", "-").lower()
    )
    out = args.out or ROOT / "bench" / "results" / f"ceiling-{device}.md"
    lines = [
        f"# Service vs in-process ceiling ({device})",
        "",
        f"Command: `python bench/ceiling_bench.py --requests {args.requests} --clients "
        f"{' '.join(map(str, args.clients))} --pairs {args.pairs}{' --env ' + ' '.join(args.env) if args.env else ''}`  ",
        f"Model: Qwen2-style decoder, hidden {args.hidden}, {args.layers} layers, K=4, fp32, random weights. "
        f"Workload: {len(reqs)} `/get_reward` requests of 1-4 texts (10-200 words), {len(texts)} items, "
        f"{min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}), seeded; closed-loop "
        f"clients. torch {torch.__version__}, bench process {torch.get_num_threads()} threads, {os.cpu_count()} "
        f"cores, {platform.processor() or platform.machine()}; clients and server share the machine.",
        "",
        "Ceiling = `engine.score(all items)` in-process (length-sorted, 2,048-token budget), with the "
        "padding cap and without; each service run is divided by the faster of the two measured just before it.",
        "",
        "| pair | clients | ceiling capped | ceiling uncapped | service items/s | p50 ms | p99 ms | service / ceiling |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (clients, ceil, res, ratio) in enumerate(rows):
        lines.append(
            f"| {i // len(args.clients)} | {clients} | {ceil['capped']:.1f} | {ceil['uncapped']:.1f} | "
            f"{res.items_per_s:.1f} | {res.p50_ms:.0f} | {res.p99_ms:.0f} | {ratio:.3f} |"
        )
    lines += ["", "| clients | median service / ceiling |", "|---:|---:|"]
    for clients in args.clients:
        med = statistics.median(r[3] for r in rows if r[0] == clients)
        lines.append(f"| {clients} | **{med:.3f}** |")
    lines += [
        "",
        "Where the time goes (medians over the pairs; service numbers from its own /metrics: batch count, "
        "`hydra_rm_batch_tokens` padded tokens, `hydra_rm_tokens` real tokens, `hydra_rm_inference_seconds` "
        "encoder time; in-process from the same counts around `engine.forward`). `encoder idle` is the "
        "share of the wall time the forward thread was not in a batch (hand-over, waiting for requests); "
        "`us / padded token` rising over in-process is contention (other threads taking the cores).",
        "",
        "| clients | run | batches | padding % | encoder s | wall s | encoder idle % | us / padded token |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for clients in args.clients:
        for label, idx in (("in-process", 1), ("service", 2)):
            picked = [sh[idx].describe() for sh in shapes if sh[0] == clients]
            med = {k: statistics.median(d[k] for d in picked) for k in picked[0]}
            lines.append(
                f"| {clients} | {label} | {med['batches']:.0f} | {med['padding %']:.1f} | {med['encoder s']:.2f} | "
                f"{med['wall s']:.2f} | {med['encoder idle %']:.1f} | {med['us / padded token']:.1f} |"
            )
    med32 = statistics.median(r[3] for r in rows if r[0] == 32) if 32 in args.clients else None
    if med32 is not None:
        lines += [
            "",
            f"Goal (issue 12): >= 0.85 at 32 clients: {'met' if med32 >= 0.85 else 'not met'} ({med32:.3f}).",
            "",
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
