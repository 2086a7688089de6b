"""A/B of oneDNN-prepacked encoder linears (HYDRA_RM_CPU_PACKED_LINEAR) in the engine, in-process, CPU.

Two engines over one model directory, one with `cpu_packed_linear=True` and one at the default
(aten's linear, as the Hugging Face forward), score the same pre-tokenized items through
`score_encoded` (the batcher's path: plan, prefix sharing, fused heads), alternating which goes first
each round; fresh texts every round, and the prompt cache cleared before each run so neither engine
reuses the other's work. torch's default threads (what `hydra-rm serve` gets). Reports each round and
the paired packed/aten ratio (mean +- s.e.), and the largest reward difference between the two.

Usage: `python bench/cpu_gemm_ab.py [--rounds 5] [--out bench/results/cpu-gemm-ab-cpu.md]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu-gemm-ab-cpu.md")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from bench.peer_vllm import PROMPT_TOKENS, build_peer_model
    from bench.prefix_bench import grpo_texts
    from model_store import ModelStore
    from model_store.default_model import shipped_default_dir
    from model_store.loader import load_reward_model
    from model_store.tokenization import Item
    from scoring.engine import ScoringEngine
    from scoring.settings import Settings

    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="hydra-cpu-gemm-ab-"))
    models = {
        "Qwen2 hidden 256, 4 layers (bench/peer_vllm.py's)": build_peer_model(tmp / "peer"),
        "embedded default (Llama, hidden 128, 2 layers)": shipped_default_dir(),
    }
    lines = [
        "# oneDNN-prepacked encoder linears vs aten's (cpu)",
        "",
        f"Command: `python bench/cpu_gemm_ab.py --rounds {args.rounds}`  ",
        f"torch {torch.__version__}, default threads ({torch.get_num_threads()}), {os.cpu_count()} cores, "
        f"{platform.machine()}. Items through `ScoringEngine.score_encoded` (plan, prefix sharing, fused "
        "heads); the two engines alternate which runs first; fresh texts each round; prompt caches cleared "
        "before every run.  ",
        "",
        "| model | workload | aten s (median) | packed s (median) | packed/aten speed, paired (mean +- s.e.) "
        "| per round | max reward diff |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for label, model_dir in models.items():
        tok = AutoTokenizer.from_pretrained(model_dir)
        store = ModelStore(tmp / "store")
        policy = Settings().batch_policy()
        engines = {
            "aten": ScoringEngine(
                load_reward_model(str(model_dir), store), policy=policy, cpu_packed_linear=False
            ),
            "packed": ScoringEngine(
                load_reward_model(str(model_dir), store), policy=policy, cpu_packed_linear=True
            ),
        }
        for e in engines.values():
            e.warmup()
        for workload, group, prompts in (("GRPO 24x8", 8, 24), ("distinct 192", 1, 192)):
            times: dict[str, list[float]] = {"aten": [], "packed": []}
            diff = 0.0
            for r in range(args.rounds):
                texts = grpo_texts(tok, 7000 + 10 * r + group, prompts, group, shared=group > 1,
                                   prompt_tokens=PROMPT_TOKENS)  # fmt: skip
                order = ["aten", "packed"] if r % 2 == 0 else ["packed", "aten"]
                out = {}
                for name in order:
                    e = engines[name]
                    enc = [e.encode(Item(text=t)) for t in texts]
                    e.prefix.cache.clear()
                    t0 = time.perf_counter()
                    out[name] = e.score_encoded(enc)
                    times[name].append(time.perf_counter() - t0)
                diff = max(diff, max(abs(a - b) for x, y in zip(out["aten"], out["packed"], strict=True)
                                     for a, b in zip(x.rewards, y.rewards, strict=True)))  # fmt: skip
            ratios = [a / p for a, p in zip(times["aten"], times["packed"], strict=True)]
            se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
            lines.append(
                f"| {label} | {workload} | {statistics.median(times['aten']):.2f} | "
                f"{statistics.median(times['packed']):.2f} | {statistics.fmean(ratios):.2f}x +- {se:.2f} | "
                f"{', '.join(f'{x:.2f}' for x in ratios)} | {diff:.1e} |"
            )
            print(lines[-1], flush=True)
    lines += ["", f"Load average at start {load_start}, at end {os.getloadavg()}."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
