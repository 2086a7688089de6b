"""Fused multi-head reward kernel vs torch eager and torch.compile, on one CUDA GPU.

    python bench/bench_multihead_reward.py            # full grid, writes bench/results/multihead_reward-<gpu>.md
    python bench/bench_multihead_reward.py --quick    # the four largest shapes only, no torch.compile
    python bench/bench_multihead_reward.py --sweep    # also tries other block sizes on the large shapes

Needs only torch and triton. Times are GPU medians from `triton.testing.do_bench`, which flushes L2
between repetitions, so a memory-bound kernel is measured against HBM rather than a warm cache;
"back-to-back" times 200 calls in a row and so includes host launch overhead, which is what a
small batch pays in the service. Bandwidth is reported against a measured device-to-device copy,
not the datasheet, and counts only the bytes the kernel must move: the B pooled rows, W, bias,
index and the fp32 outputs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BS = (1, 64, 512, 4096)
HS = (768, 2048, 4096)
KS = (1, 4, 8, 16)
T = 16  # sequence length of the synthetic hidden states; only B rows of it are read
DTYPE = torch.bfloat16
LARGE = 512 * 4096  # the goals apply at B*H >= 512*4096
GOAL_SPEEDUP, GOAL_BW = 3.0, 0.70


def eager(hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple:
    """What one would write without the kernel (bf16 linear, fp32 reductions)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    pooled = hidden[rows, index]
    rewards = torch.nn.functional.linear(pooled, weight, bias).float()
    return rewards, rewards.amin(1), rewards.amax(1), rewards.mean(1), rewards.std(1, correction=0)


def quantiles_ms(fn: Callable[[], object]) -> tuple[float, float, float]:
    """p20, p50, p80 of the per-call time (ms): the spread says whether a difference is noise."""
    import triton.testing

    p20, p50, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
    return float(p20), float(p50), float(p80)


def median_ms(fn: Callable[[], object]) -> float:
    return quantiles_ms(fn)[1]


def back_to_back_us(fn: Callable[[], object], n: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy: reads and writes `nbytes`, so 2 * nbytes move per copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def kernel_bytes(b: int, h: int, k: int) -> int:
    elem = torch.empty((), dtype=DTYPE).element_size()
    return b * h * elem + k * h * elem + k * elem + b * 8 + b * k * 4 + 4 * b * 4


def make_inputs(b: int, h: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(b * 1_000_003 + h * 101 + k)
    hidden = torch.randn(b, T, h, device="cuda", dtype=DTYPE, generator=g)
    index = torch.randint(0, T, (b,), device="cuda", generator=g)
    weight = (torch.randn(k, h, device="cuda", generator=g) / h**0.5).to(DTYPE)
    bias = torch.randn(k, device="cuda", generator=g).to(DTYPE)
    return hidden, index, weight, bias


def check(
    got: tuple, hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> float:
    """Max abs error vs the float64 reference; a benchmark of a wrong kernel is worthless."""
    from kernels.multihead_reward import multihead_reward_reference

    want = multihead_reward_reference(hidden, index, weight, bias, compute_dtype=torch.float64)
    err = max((g.double() - w).abs().max().item() for g, w in zip(got, want, strict=True))
    if not err <= 1e-3:
        raise SystemExit(f"kernel output differs from the float64 reference by {err:.3g}; not benchmarking")
    return err


def sweep_configs() -> list[dict[str, int]]:
    grid = itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (2, 3, 4))
    return [{"BLOCK_B": bb, "BLOCK_H": bh, "num_warps": w, "num_stages": s} for bb, bh, w, s in grid]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="large shapes only, skip torch.compile")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--sweep", action="store_true", help="try other launch configs on the large shapes")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown path (default bench/results/multihead_reward-<gpu>.md)",
    )
    args = ap.parse_args()

    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_multihead_reward needs a CUDA GPU: torch.cuda.is_available() is False on this machine, so nothing "
            "was measured and no results file was written. Run `python bench/bench_multihead_reward.py` on a GPU host."
        )
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter would be benchmarked instead of the kernel")
    try:
        import triton
    except ImportError:
        raise SystemExit("bench_multihead_reward needs triton (pip install triton)") from None
    gpu = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out_path = args.out or REPO / "bench" / "results" / f"multihead_reward-{slug}.md"
    torch.backends.cuda.matmul.allow_tf32 = False  # irrelevant for bf16, explicit for the record
    shapes = [(b, h, k) for b, h, k in itertools.product(BS, HS, KS) if not args.quick or b * h >= LARGE]
    if args.quick:
        shapes = [s for s in shapes if s[2] in (1, 16)]
    use_compile = not (args.quick or args.no_compile)

    copy_gbs = copy_bandwidth_gbs()
    print(f"{gpu}: device-to-device copy {copy_gbs:.0f} GB/s", flush=True)
    rows, sweep_rows = [], []
    for b, h, k in shapes:
        row, sweep = bench_shape(b, h, k, copy_gbs, use_compile, args.sweep and b * h >= LARGE)
        rows.append(row)
        if sweep:
            sweep_rows.append(sweep)
        torch.cuda.empty_cache()

    write_report(out_path, gpu, copy_gbs, rows, sweep_rows, use_compile, triton.__version__)
    print(f"wrote {out_path}")


def bench_shape(
    b: int, h: int, k: int, copy_gbs: float, use_compile: bool, sweep: bool
) -> tuple[dict, tuple | None]:
    from kernels.multihead_reward import device_limits, launch_config, multihead_reward_triton

    hidden, index, weight, bias = make_inputs(b, h, k)
    out = multihead_reward_triton(hidden, index, weight, bias)
    err = check(out, hidden, index, weight, bias)

    def run_kernel() -> object:
        return multihead_reward_triton(hidden, index, weight, bias, out=out)

    def run_eager() -> object:
        return eager(hidden, index, weight, bias)

    k20, t_kernel, k80 = quantiles_ms(run_kernel)
    e20, t_eager, e80 = quantiles_ms(run_eager)
    t_compile = float("nan")
    if use_compile:
        torch._dynamo.reset()  # a fresh static graph per shape; no recompile-limit fallback to eager
        compiled = torch.compile(eager, dynamic=False)
        compiled(hidden, index, weight, bias)
        t_compile = median_ms(lambda: compiled(hidden, index, weight, bias))
    gbs = kernel_bytes(b, h, k) / (t_kernel * 1e-3) / 1e9
    n_sm, smem = device_limits(hidden.device)
    cfg = launch_config(b, h, k, x_dtype=DTYPE, w_dtype=DTYPE, n_sm=n_sm, smem_bytes=smem)
    row = {
        "B": b,
        "H": h,
        "K": k,
        "MB": kernel_bytes(b, h, k) / 1e6,
        "kernel_us": t_kernel * 1e3,
        "kernel_p20_p80_us": (k20 * 1e3, k80 * 1e3),
        "eager_us": t_eager * 1e3,
        "eager_p20_p80_us": (e20 * 1e3, e80 * 1e3),
        "compile_us": t_compile * 1e3,
        "GB/s": gbs,
        "copy%": 100 * gbs / copy_gbs,
        "x_eager": t_eager / t_kernel,
        "x_compile": t_compile / t_kernel,
        "b2b_kernel_us": back_to_back_us(run_kernel),
        "b2b_eager_us": back_to_back_us(run_eager),
        "err": err,
        "cfg": f"{cfg['BLOCK_B']}/{cfg['BLOCK_H']}/{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}",
    }
    print(
        f"B={b:5d} H={h:5d} K={k:3d}  kernel {row['kernel_us']:8.1f} us  eager {row['eager_us']:8.1f} us  "
        f"compile {row['compile_us']:8.1f} us  {gbs:7.0f} GB/s ({row['copy%']:5.1f}% of copy)  "
        f"x{row['x_eager']:.2f} eager",
        flush=True,
    )
    if not sweep:
        return row, None
    best = (t_kernel, "default")
    for c in sweep_configs():
        try:
            t = median_ms(lambda c=c: multihead_reward_triton(hidden, index, weight, bias, out=out, config=c))
        except Exception as e:  # out of shared memory / registers for this config
            print(f"  skip {c}: {type(e).__name__}", flush=True)
            continue
        if t < best[0]:
            best = (t, str(c))
    return row, (b, h, k, t_kernel * 1e3, best[0] * 1e3, best[1])


def _spread(row: dict, name: str) -> str:
    lo, hi = row[f"{name}_p20_p80_us"]
    return f"{row[f'{name}_us']:.1f} [{lo:.1f}, {hi:.1f}]"


def write_report(
    path: Path,
    gpu: str,
    copy_gbs: float,
    rows: list[dict],
    sweep_rows: list[tuple],
    use_compile: bool,
    triton_version: str,
) -> None:
    large = [r for r in rows if r["B"] * r["H"] >= LARGE]
    speed_ok = [r for r in large if r["x_eager"] >= GOAL_SPEEDUP]
    bw_ok = [r for r in large if r["copy%"] >= 100 * GOAL_BW]
    lines = [
        f"# Fused multi-head reward kernel on {gpu}",
        "",
        f"Generated by `python bench/bench_multihead_reward.py` on {dt.date.today().isoformat()}; torch {torch.__version__}, "
        f"triton {triton_version}, CUDA {torch.version.cuda}. Inputs bf16, hidden `[B, {T}, H]` gathered at a "
        "random position per row. Times are `triton.testing.do_bench` p50 [p20, p80] with L2 flushed between runs; "
        "back-to-back (b2b) is 200 consecutive calls, host overhead included.",
        "",
        f"Device-to-device copy bandwidth (measured): **{copy_gbs:.0f} GB/s**.",
        "",
        "Goals at B·H ≥ 512·4096 (measured, not asserted in tests):",
        f"- ≥ {GOAL_SPEEDUP:.0f}× torch eager: {len(speed_ok)}/{len(large)} shapes",
        f"- ≥ {100 * GOAL_BW:.0f}% of copy bandwidth: {len(bw_ok)}/{len(large)} shapes",
        "",
        "| B | H | K | MB moved | kernel µs p50 [p20, p80] | eager µs p50 [p20, p80] | compile µs | GB/s | % copy | × eager | × compile "
        "| b2b kernel µs | b2b eager µs | max err | BLOCK_B/H/K warps stages |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        comp = f"{r['compile_us']:.1f}" if use_compile else "—"
        xcomp = f"{r['x_compile']:.2f}" if use_compile else "—"
        lines.append(
            f"| {r['B']} | {r['H']} | {r['K']} | {r['MB']:.2f} | {_spread(r, 'kernel')} | {_spread(r, 'eager')} "
            f"| {comp} | {r['GB/s']:.0f} | {r['copy%']:.1f} | {r['x_eager']:.2f} | {xcomp} "
            f"| {r['b2b_kernel_us']:.1f} | {r['b2b_eager_us']:.1f} | {r['err']:.1e} | {r['cfg']} |"
        )
    if sweep_rows:
        lines += [
            "",
            "## Launch-config sweep (large shapes)",
            "",
            "| B | H | K | default µs | best µs | best config |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        lines += [f"| {b} | {h} | {k} | {d:.1f} | {t:.1f} | {c} |" for b, h, k, d, t, c in sweep_rows]
    lines += [
        "",
        "The eager baseline is gather + bf16 `linear` + `.float()` + amin + amax + mean + std; the compiled "
        "baseline is `torch.compile` (default mode, static shapes) of the same function.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
