"""Which stored form of (Phi^T Phi + lam I)^-1 the service should keep: time, memory, fp32 error.

Forms, each evaluated in float32 (what serving does) against a float64 linear-solve oracle:
- inverse: M = A^-1, u^2 = phi^T M phi (a quadratic form: cancels in fp32 when A is ill-conditioned);
- cholesky: A = L L^T, W = L^-1, u = |W phi|;
- eigen (full): basis V^T, coef 1/(s + lam), u^2 = sum coef (V^T phi)^2 (positive terms only);
- eigen low rank r: the top r directions plus (|phi|^2 - |V_r^T phi|^2) / lam.
Features imitate a transformer's pooled state: a large shared mean direction and a decaying spectrum.

    nice -n 10 .venv/bin/python bench/novelty_forms.py --out bench/results/novelty-forms-cpu.md
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from model_store.novelty import fit_novelty, novelty, novelty_exact


def features(n: int, h: int, gen: torch.Generator, shift: float = 0.0, hard: bool = False) -> torch.Tensor:
    """`hard`: 8 decades of spectrum and a mean 20x larger (massive activations, as in LLM hidden states)."""
    spectrum = (
        torch.logspace(2, -6, h, dtype=torch.float64)
        if hard
        else torch.logspace(0, -3, h, dtype=torch.float64)
    )
    mean = torch.randn(h, generator=torch.Generator().manual_seed(h), dtype=torch.float64) * (
        10.0 if hard else 0.5
    )
    z = torch.randn(n, h, generator=gen, dtype=torch.float64) * spectrum.sqrt()
    basis = torch.linalg.qr(
        torch.randn(h, h, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    )[0]
    x = z @ basis.T + mean
    if shift:
        x = x + shift * torch.randn(n, h, generator=gen, dtype=torch.float64) * 0.05
    return x


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want).abs() / want.abs().clamp(min=1e-30)).max())


def run(h: int, n: int, lam: float, rank: int, hard: bool) -> dict[str, object]:
    gen = torch.Generator().manual_seed(h)
    ref = features(n, h, gen, hard=hard)
    test = torch.cat([features(256, h, gen, hard=hard), features(256, h, gen, shift=1.0, hard=hard)]).float()
    want = novelty_exact(test, ref, lam)
    a = ref.T @ ref + lam * torch.eye(h, dtype=torch.float64)
    out: dict[str, object] = {"H": h, "N": n, "lam": lam, "features": "hard" if hard else "mild"}

    t0 = time.perf_counter()
    m = torch.linalg.inv(a).float()
    t_inv = time.perf_counter() - t0
    got = ((test @ m) * test).sum(1).clamp(min=0).sqrt()
    out["inverse"] = (t_inv, h * h * 4, rel_err(got, want))

    t0 = time.perf_counter()
    lo = torch.linalg.cholesky(a)
    w = torch.linalg.solve_triangular(lo, torch.eye(h, dtype=torch.float64), upper=False).float()
    t_ch = time.perf_counter() - t0
    got = torch.linalg.vector_norm(test @ w.T, dim=1)
    out["cholesky"] = (t_ch, h * h * 4, rel_err(got, want))

    t0 = time.perf_counter()
    chosen = fit_novelty(ref, lam)  # the default: the Cholesky form, evaluated as the service does
    out["fit_novelty default"] = (time.perf_counter() - t0, h * h * 4 + h * 4,
                                  rel_err(novelty(test, chosen, dtype=torch.float32), want))  # fmt: skip

    t0 = time.perf_counter()
    stat = fit_novelty(ref, lam, rank=h)
    t_eig = time.perf_counter() - t0
    out["eigen"] = (t_eig, h * h * 4 + h * 4, rel_err(novelty(test, stat, dtype=torch.float32), want))

    t0 = time.perf_counter()
    low = fit_novelty(ref, lam, rank=rank)
    t_low = time.perf_counter() - t0
    got = novelty(test, low, dtype=torch.float32)
    # the low-rank form is an approximation: its error vs the exact u, and its own fp32 rounding
    out[f"eigen r={rank}"] = (t_low, rank * h * 4 + rank * 4, rel_err(got, want))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[384, 1024, 2048])
    ap.add_argument("--n", type=int, default=2400)
    ap.add_argument("--lam", type=float, nargs="+", default=[0.01, 1.0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for h in args.hidden:
        for hard in (False, True):
            for lam in args.lam:
                rows.append(run(h, args.n, lam, rank=max(1, h // 4), hard=hard))
            print(rows[-1], flush=True)
    lines = [
        "# Stored form of the novelty statistic (bench/novelty_forms.py)",
        "",
        f"`nice -n 10 .venv/bin/python bench/novelty_forms.py` — 1 torch thread, N={args.n} reference rows, "
        f"load {os.getloadavg()[0]:.2f}. Error: max relative error of fp32 u vs the float64 solve, over 256 "
        "held-out + 256 shifted rows. Fit time includes building the stored matrix (float64).",
        "",
        "| H | features | lambda | form | fit s | stored MiB | max rel. error |",
        "|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        for k, v in r.items():
            if isinstance(v, tuple):
                lines.append(
                    f"| {r['H']} | {r['features']} | {r['lam']} | {k} | {v[0]:.3f} | {v[1] / 2**20:.2f} | {v[2]:.2e} |"
                )
    lines += [
        "",
        "Memory at H = 4,096 (float32): inverse / Cholesky factor / full eigen basis 64.0 MiB each "
        "(4096^2 x 4 bytes; + 16 KiB of coef); low rank r = 1,024: 16.0 MiB.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
