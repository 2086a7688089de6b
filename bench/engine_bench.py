"""Engine throughput: length-sorted token-budget batches vs naive fixed-size batches in arrival order.

One model, one mixed-length workload, one run, so the ratios are side by side. Writes
bench/results/engine-<device>.md. Usage: `python bench/engine_bench.py [--items 400] [--hidden 256]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model_store import ModelStore  # noqa: E402
from model_store.default_model import build_default_model  # noqa: E402
from model_store.loader import load_reward_model  # noqa: E402
from scoring.batching import BatchPolicy, padded_tokens, plan_batches  # noqa: E402
from scoring.engine import EncodedItem, Item, ScoringEngine  # noqa: E402

WORDS = (
    "the reward model scores each response to a prompt and several linear heads share one encoder so the "
    "policy receives the minimum which resists over optimisation of a flawed proxy while disagreement "
    "between heads measures uncertainty about quality helpfulness and harm"
).split()


def workload(n: int, seed: int = 0) -> list[Item]:
    """Prompt + response of 10-200 words each (the mix of docs/architecture.md's measurements), in random order."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        p = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
        r = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 200)))
        items.append(Item(prompt=p, response=r))
    return items


def run_schedule(
    engine: ScoringEngine, encoded: list[EncodedItem], batches: list[list[int]]
) -> tuple[float, int]:
    t0 = time.perf_counter()
    for b in batches:
        engine.forward([encoded[i] for i in b])
    elapsed = time.perf_counter() - t0
    computed = sum(padded_tokens([encoded[i].n_tokens for i in b]) for b in batches)
    return elapsed, computed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="hydra-bench-"))
    build_default_model(tmp / "model", hidden_size=args.hidden, num_layers=args.layers)
    rm = load_reward_model(str(tmp / "model"), ModelStore(tmp / "store"))
    engine = ScoringEngine(
        rm, policy=BatchPolicy(token_budget=4096, max_batch_size=64, max_padding=float("inf"))
    )
    items = workload(args.items)
    encoded = [engine.encode(it) for it in items]
    lengths = [e.n_tokens for e in encoded]
    real = sum(lengths)
    engine.forward(encoded[:8])  # warm-up

    schedules: dict[str, list[list[int]]] = {
        "one item at a time": [[i] for i in range(len(encoded))],
        "naive fixed 8, arrival order": [
            list(range(i, min(i + 8, len(encoded)))) for i in range(0, len(encoded), 8)
        ],
        "naive fixed 32, arrival order": [
            list(range(i, min(i + 32, len(encoded)))) for i in range(0, len(encoded), 32)
        ],
    }
    for budget in (1024, 2048, 4096, 8192, 16384):
        schedules[f"sorted, token budget {budget}"] = plan_batches(lengths, budget, 64)

    # Round-robin over schedules inside each repeat, so a noisy neighbour slows all of them alike.
    times: dict[str, list[float]] = {name: [] for name in schedules}
    computed: dict[str, int] = {}
    for rep in range(args.repeats):
        for name, batches in schedules.items():
            elapsed, computed[name] = run_schedule(engine, encoded, batches)
            times[name].append(elapsed)
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    rows = []
    for name, batches in schedules.items():
        t = statistics.median(times[name])
        rows.append((name, len(encoded) / t, computed[name] / real, len(batches)))
        print(f"{name:34s} {len(encoded) / t:8.1f} items/s  padding {computed[name] / real:5.2f}", flush=True)

    base = dict((r[0], r[1]) for r in rows)
    ref = base["naive fixed 32, arrival order"]
    device = (
        "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name().replace(" ", "-").lower()
    )
    out = args.out or Path(__file__).parent / "results" / f"engine-{device}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Engine throughput ({device})",
        "",
        f"Command: `python bench/engine_bench.py --items {args.items} --hidden {args.hidden} --layers {args.layers}`  ",
        f"Model: Llama-style decoder, hidden {args.hidden}, {args.layers} layers, K=4 heads, fp32; "
        f"{len(encoded)} prompt+response items, {min(lengths)}-{max(lengths)} tokens "
        f"(mean {real / len(lengths):.0f}); median of {args.repeats} runs; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}.",
        "",
        "| schedule | items/s | padding ratio (computed/real tokens) | batches | vs naive fixed 32 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, ips, pad, nb in rows:
        lines.append(f"| {name} | {ips:.1f} | {pad:.2f} | {nb} | {ips / ref:.2f}x |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
