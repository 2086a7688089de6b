"""What the feature-space novelty u (issue 21) costs on a GPU: the fused kernel and the engine, with and
without the statistic, side by side in one run.

1. Kernel: pooled bf16 rows of a 7-8B model's width (H=4096, K=4) through `multihead_reward_triton`
   vs `multihead_reward_triton_novelty` with the full inverse-Cholesky form (R = H, 64 MiB fp32) and
   low-rank eigen forms (R = 1024, 256); medians of CUDA-event timings.
2. Engine: the Llama-3-8B-shaped random reward model of bench/gpu_e2e.py (bf16, K=4), the same
   mixed-length items scored with `heads.novelty` unset and set (a statistic fitted on the engine's own
   pooled features of other texts), in alternating rounds (ABAB...), items/s and the paired ratio.

Usage: `python bench/gpu_novelty.py [--small]` on a CUDA machine; writes bench/results/novelty-<gpu>.md
(or --out). `--small` runs a tiny shape (CPU works too), to check the script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.gpu_e2e import LLAMA3_8B, SMALL, build_model, mixed_texts, sync  # noqa: E402
from kernels.multihead_reward import (  # noqa: E402
    NoveltyTensors,
    multihead_reward,
    multihead_reward_novelty,
)
from model_store.novelty import fit_novelty  # noqa: E402
from scoring.engine import Item, ScoringEngine  # noqa: E402


def median_ms(fn: Callable[[], object], device: torch.device, n: int = 50) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(n):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_rows(h: int, k: int, device: torch.device, ranks: list[int | None]) -> list[str]:
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(2.0, 0.05, h, dtype=torch.float64)
    ref = torch.randn(2 * h + 64, h, generator=g, dtype=torch.float64) * scale
    weight = (torch.randn(k, h, generator=g) / h**0.5).to(device, torch.bfloat16)
    bias = torch.randn(k, generator=g).to(device)
    stats = {}
    for r in ranks:
        st = fit_novelty(ref, 1.0, rank=r)
        stats[r] = (NoveltyTensors(st.basis.to(device), st.coef.to(device), st.resid), st.basis.numel() * 4)
    out = [
        "| B | heads only (ms) | " + " | ".join(f"+u R={r or h} (ms)" for r in ranks) + " |",
        "|---:|---:|" + "---:|" * len(ranks),
    ]
    for b in (16, 64, 256, 1024):
        pooled = (torch.randn(b, h, generator=g, dtype=torch.float64) * scale).to(device, torch.bfloat16)
        base = median_ms(lambda p=pooled: multihead_reward(p, None, weight, bias), device)
        cells = [f"{base:.4f}"]
        for r in ranks:
            nov = stats[r][0]
            t = median_ms(lambda p=pooled, n=nov: multihead_reward_novelty(p, None, weight, bias, n), device)
            cells.append(f"{t:.4f}")
        out.append(f"| {b} | " + " | ".join(cells) + " |")
    out.append("")
    out.append(
        "Statistic size (fp32): " + ", ".join(f"R={r or h}: {stats[r][1] / 2**20:.1f} MiB" for r in ranks)
    )
    return out


def engine_rows(small: bool, device: torch.device, items: int, rounds: int, rank: int | None) -> list[str]:
    shape = SMALL if small else LLAMA3_8B
    dtype = torch.float32 if small else torch.bfloat16
    rm = build_model(Path("/tmp/gpu-novelty-model"), shape, dtype, device)
    engine = ScoringEngine(rm)
    texts = mixed_texts(items, 20, 400, seed=1)
    ref_texts = mixed_texts(max(512, items), 20, 400, seed=2)
    phi = engine.pooled_features([engine.encode(Item(text=t)) for t in ref_texts])
    st = fit_novelty(phi, 1.0, rank=rank)
    nov = NoveltyTensors(st.basis.to(device), st.coef.to(device), st.resid)
    enc = [engine.encode(Item(text=t)) for t in texts]
    tokens = sum(e.n_tokens for e in enc)

    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        engine.score_encoded(enc)
        sync(device)
        return time.perf_counter() - t0

    engine.heads.novelty = None
    run()
    engine.heads.novelty = nov
    with_u = engine.score_encoded(enc)
    assert all(s.novelty is not None for s in with_u), "the engine served no u with the statistic set"
    off, on, ratios = [], [], []
    for i in range(rounds):
        order = (None, nov) if i % 2 == 0 else (nov, None)
        got = {}
        for n in order:
            engine.heads.novelty = n
            got[n is not None] = run()
        off.append(got[False])
        on.append(got[True])
        ratios.append(got[False] / got[True])  # items/s with u over items/s without
    mean = statistics.mean(ratios)
    se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    return [
        f"Model: {rm.name} ({dtype}), {items} mixed-length items ({tokens} tokens), {rounds} alternating rounds, "
        f"statistic rank {st.rank} fitted on {len(ref_texts)} other texts' pooled features.",
        "",
        "| | items/s (median) |",
        "|---|---:|",
        f"| without u | {items / statistics.median(off):.1f} |",
        f"| with u | {items / statistics.median(on):.1f} |",
        "",
        f"Paired ratio with/without (items/s): **{mean:.4f} +- {se:.4f}** (mean +- s.e. over {rounds} rounds; "
        f"per round: {', '.join(f'{r:.3f}' for r in ratios)})",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--items", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--rank", type=int, default=None, help="engine statistic rank (default: full)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    h = 64 if args.small else 4096
    lines = [
        f"# Novelty u on {name}: kernel and engine cost",
        "",
        f"Command: `python bench/gpu_novelty.py{' --small' if args.small else ''} --items {args.items} "
        f"--rounds {args.rounds}`; torch {torch.__version__}.",
        "",
        f"## Kernel (H={h}, K=4, bf16 rows)",
        "",
    ]
    slug = name.lower().replace(" ", "-")
    out = args.out or ROOT / "bench" / "results" / f"novelty-{slug}.md"
    lines += kernel_rows(h, 4, device, [None, 1024 if not args.small else 16, 256 if not args.small else 8])
    out.write_text("\n".join(lines) + "\n")  # the kernel half survives a time limit on the engine half
    lines += ["", "## Engine", ""]
    lines += engine_rows(args.small, device, args.items, args.rounds, args.rank)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
