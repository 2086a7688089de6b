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
from dataclasses import replace
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
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from model_store.default_model import corpus_path, train_tokenizer
    from model_store.manifest import RewardManifest

    dest.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(corpus_path().read_text().splitlines())
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        num_labels=k,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.1)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    RewardManifest.default_for(k, pooling="last_token").write(dest)
    return dest


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
    from service.engine import ScoringEngine
    from service.settings import Settings

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

    def ceiling() -> dict[str, float]:
        out = {}
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.score(items)
            out[name] = len(items) / (time.perf_counter() - t0)
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
        [sys.executable, "-m", "service", "serve", "--model", str(model_dir), "--port", str(port)], env, port
    )
    url = f"http://127.0.0.1:{port}"
    rows: list[tuple[int, dict[str, float], Any, float]] = []
    try:
        asyncio.run(drive(url, "/get_reward", bodies[:16], 16, 4))  # warm-up
        ceiling()
        for i in range(args.pairs):
            for clients in args.clients:
                ceil = ceiling()
                res = asyncio.run(drive(url, "/get_reward", bodies, len(texts), clients))
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
