"""Tables (mean +- s.e. over seeds, paired differences within a seed) and a plot of the overopt results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SHOW_NS = (1, 4, 16, 64, 256, 1024, 4096)


def mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def fmt(xs: list[float], digits: int = 3) -> str:
    m, se = mean_se(xs)
    return f"{m:+.{digits}f} ± {se:.{digits}f}"


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    ns = results["ns"]
    seeds = list(results["per_seed"])
    keys = list(results["per_seed"][seeds[0]])
    curves = {k: [results["per_seed"][s][k] for s in seeds] for k in keys}  # [seed][n]
    big = ns[-1]
    mid = 256 if 256 in ns else ns[len(ns) // 2]
    i_mid, i_big = ns.index(mid), ns.index(big)
    single = curves["single"]
    ens = curves.get("full-ensemble/min")
    rows = {}
    for k, cs in curves.items():
        peak_idx = [max(range(len(c)), key=c.__getitem__) for c in cs]
        row: dict[str, Any] = {
            "gold": {n: [c[i] for c in cs] for i, n in enumerate(ns)},
            "peak_n": [ns[i] for i in peak_idx],
            "drop_peak_to_max_n": [c[i_big] - max(c) for c in cs],
            "diff_vs_single": {
                n: [c[i] - b[i] for c, b in zip(cs, single, strict=True)]
                for i, n in ((i_mid, mid), (i_big, big))
            },
        }
        if ens is not None:
            row["diff_vs_full_min"] = {n: [c[i] - e[i] for c, e in zip(cs, ens, strict=True)] for i, n in
                                       ((i_mid, mid), (i_big, big))}  # fmt: skip
            gains = {}
            for i, n in ((i_mid, mid), (i_big, big)):
                g_ens = sum(e[i] - s[i] for e, s in zip(ens, single, strict=True))
                g = sum(c[i] - s[i] for c, s in zip(cs, single, strict=True))
                gains[n] = g / g_ens if g_ens else None
            row["share_of_full_min_gain"] = gains
        rows[k] = row
    return {"mid": mid, "big": big, "rows": rows, "seeds": len(seeds)}


def markdown(results: dict[str, Any]) -> str:
    s = summarise(results)
    ns = [n for n in results["ns"] if n in SHOW_NS or n == results["ns"][-1]]
    kl = dict(zip(results["ns"], results["kl"], strict=True))
    mid, big = s["mid"], s["big"]
    out = [
        "# Best-of-n over-optimisation: K-head recipes vs a full ensemble (offline, gold = VADER)",
        "",
        f"Command: `{results.get('command', '')}`  ",
        f"Seeds: {s['seeds']}; pool {results['setup']['pool_size']} candidates x {results['setup']['n_prompts']} prompts "
        "(responses scored alone: gold ignores the prompt); "
        f"{results['setup']['n_pairs']} training pairs with 25% of labels flipped; K = {results['setup']['heads']}; "
        f"UWO lambda 0.5. Wall time {results['seconds'] / 60:.1f} min on a shared 2-core CPU (other jobs ran; "
        "timings are contended, compare them within this run only). Mean gold of a random pool item: "
        f"{results['gold_mean_pool']:+.3f}.",
        "",
        "## Gold reward of best-of-n (mean ± s.e. over seeds)",
        "",
        "| method | " + " | ".join(f"n={n} (KL {kl[n]:.2f})" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for k, row in s["rows"].items():
        out.append(f"| {k} | " + " | ".join(fmt(row["gold"][n]) for n in ns) + " |")
    out += [
        "",
        f"## Paired differences within a seed (mean ± s.e.), at n={mid} and n={big}",
        "",
        f"| method | vs single n={mid} | vs single n={big} | vs full-ensemble/min n={mid} | "
        f"vs full-ensemble/min n={big} | share of full-min gain n={mid} | n={big} | peak n (median) | "
        f"fall from peak to n={big} | seeds falling |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, row in s["rows"].items():
        dv = row["diff_vs_single"]
        df = row.get("diff_vs_full_min", {mid: [float("nan")], big: [float("nan")]})
        sh = row.get("share_of_full_min_gain", {mid: None, big: None})
        shs = [f"{100 * v:.0f}%" if v is not None else "-" for v in (sh[mid], sh[big])]
        peaks = sorted(row["peak_n"])
        falls = sum(1 for d in row["drop_peak_to_max_n"] if d < -0.005)
        out.append(
            f"| {k} | {fmt(dv[mid])} | {fmt(dv[big])} | {fmt(df[mid])} | {fmt(df[big])} | {shs[0]} | {shs[1]} | "
            f"{peaks[len(peaks) // 2]} | {fmt(row['drop_peak_to_max_n'])} | {falls}/{len(peaks)} |"
        )
    out += [
        "",
        "## Cost per method (mean over seeds; scoring through the service engine, one thread)",
        "",
        "| method | train s | scoring items/s | weights MiB | held-out head corr | held-out accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for m, c in results["costs"].items():
        corr = f"{mean_se(c['head_corr'])[0]:.3f}" if c["head_corr"] else "-"
        out.append(
            f"| {m} | {mean_se(c['train_seconds'])[0]:.1f} | {mean_se(c['score_items_per_s'])[0]:.0f} | "
            f"{mean_se(c['weight_bytes'])[0] / 2**20:.2f} | {corr} | {mean_se(c['ref_accuracy'])[0]:.3f} |"
        )
    out += [
        "",
        "Head correlation: K-head models on their held-out reference split; the full ensemble's between its "
        "independently trained members on pool items. Held-out accuracy is against noisy labels (25% flipped).",
    ]
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarise(results)
    ns, kl = results["ns"], results["kl"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), sharey=True)
    for ax, agg in zip(axes, ("min", "mean", "uwo"), strict=True):
        for k, row in s["rows"].items():
            if k != "single" and not k.endswith("/" + agg):
                continue
            ms = [mean_se(row["gold"][n]) for n in ns]
            m = [x[0] for x in ms]
            se = [x[1] for x in ms]
            ax.errorbar(kl, m, yerr=se, marker="o", ms=3, capsize=2, label=k, lw=2 if "full" in k else 1.2)
        ax.set_title(f"aggregation: {agg} (single model in every panel)")
        ax.set_xlabel("KL(best-of-n || base) = log n - (n-1)/n")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"gold (VADER compound), mean ± s.e. over {s['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(results: dict[str, Any], out: Path, prefix: str = "overopt") -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{prefix}.json"
    js.write_text(json.dumps(results, indent=1) + "\n")
    md = out / f"{prefix}.md"
    png = plot(results, out / f"{prefix}.png")
    md.write_text(markdown(results) + f"\n![gold vs KL]({png.name})\n")
    return [md, png, js]
