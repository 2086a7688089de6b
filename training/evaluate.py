"""`hydra-rm eval`: accuracy per head and aggregation, calibration, head correlation, disagreement AUROC.

Metrics are pure functions of the normalised rewards of chosen and rejected responses, [N, K] each,
so a small fixed case can be checked by hand; `evaluate_model` scores through the engine first.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from model_store.aggregation import Aggregation

BINS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def aggregate(r: torch.Tensor, how: str, lam: float) -> torch.Tensor:
    """Serving's `Aggregation` over [N, K] rewards (ValueError for an unknown `how`)."""
    return Aggregation.parse(how, r.shape[1], lam).apply_rows(r)


def head_correlation(z: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Pearson correlation between heads over items ([N, K] rewards): mean off-diagonal, and the matrix."""
    c = torch.corrcoef(z.T.double())
    k = c.shape[0]
    return float((c.sum() - c.diagonal().sum()) / (k * (k - 1))), c


def accuracy(margin: torch.Tensor) -> float:
    """Share of pairs ranked right; a tie counts half."""
    return float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())


def reliability(p: torch.Tensor, bins: tuple[float, ...] = BINS) -> tuple[float, list[dict[str, Any]]]:
    """ECE of P(chosen > rejected) = p: confidence max(p, 1-p) binned over [0.5, 1.0]; the last bin
    is closed. Returns (ECE, per-bin count / confidence / accuracy)."""
    conf = torch.maximum(p, 1 - p).double()
    correct = (p > 0.5).double() + 0.5 * (p == 0.5).double()
    rows, ece, n = [], 0.0, len(p)
    for i, (lo, hi) in enumerate(zip(bins, bins[1:], strict=False)):
        sel = (conf >= lo) & ((conf < hi) if i < len(bins) - 2 else (conf <= hi))
        k = int(sel.sum())
        row: dict[str, Any] = {"lo": lo, "hi": hi, "count": k, "confidence": None, "accuracy": None}
        if k:
            c, a = float(conf[sel].mean()), float(correct[sel].mean())
            row.update(confidence=c, accuracy=a)
            ece += k / n * abs(a - c)
        rows.append(row)
    return ece, rows


def auroc(score: torch.Tensor, positive: torch.Tensor) -> float | None:
    """P(score of a positive > score of a negative), ties half (Mann-Whitney); None if one class is empty."""
    pos, neg = score[positive].double(), score[~positive].double()
    if len(pos) == 0 or len(neg) == 0:
        return None
    gt = (pos[:, None] > neg[None, :]).double().sum()
    eq = (pos[:, None] == neg[None, :]).double().sum()
    return float((gt + 0.5 * eq) / (len(pos) * len(neg)))


def metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, head_names: list[str], lam: float = 0.5
) -> dict[str, Any]:
    """Everything but throughput and memory, from normalised rewards [N, K]."""
    k = chosen.shape[1]
    margin = chosen - rejected
    out: dict[str, Any] = {"pairs": chosen.shape[0], "heads": head_names, "uwo_lambda": lam}
    out["accuracy_per_head"] = {n: accuracy(margin[:, i]) for i, n in enumerate(head_names)}
    aggs = ("min", "mean", "max", "uwo")
    out["accuracy"] = {a: accuracy(aggregate(chosen, a, lam) - aggregate(rejected, a, lam)) for a in aggs}
    out["ece_per_head"] = {n: reliability(torch.sigmoid(margin[:, i]))[0] for i, n in enumerate(head_names)}
    out["ece"] = {
        a: reliability(torch.sigmoid(aggregate(chosen, a, lam) - aggregate(rejected, a, lam)))[0]
        for a in aggs
    }
    p = torch.sigmoid(margin)  # per-head P(chosen preferred)
    probs = {"min": p.min(1).values, "median": p.median(1).values, "max": p.max(1).values}
    out["reliability"] = {}
    for name, q in probs.items():
        ece, rows = reliability(q)
        out["reliability"][name] = {"ece": ece, "bins": rows}
    if k > 1:
        out["head_correlation"], c = head_correlation(torch.cat([chosen, rejected]))
        out["head_correlation_matrix"] = c.tolist()
        disagreement = (chosen.std(1, correction=0) + rejected.std(1, correction=0)) / 2
        misranked = aggregate(chosen, "mean", lam) <= aggregate(rejected, "mean", lam)
        out["disagreement_auroc_misranked"] = auroc(disagreement, misranked)
        out["misranked_share"] = float(misranked.double().mean())
    else:
        out["head_correlation"] = None
        out["disagreement_auroc_misranked"] = None
    return out


def plot_reliability(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0.5, 1.0], [0.5, 1.0], "k--", lw=1, label="perfect")
    for name, rel in report["reliability"].items():
        pts = [(b["confidence"], b["accuracy"]) for b in rel["bins"] if b["count"]]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "o-", label=f"{name} over heads (ECE {rel['ece']:.3f})")
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("confidence of the BT probability (bins 0.5-1.0 by 0.1)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{report.get('model', '')}: reliability, {report['pairs']} pairs", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_model(
    specs: list[str], pairs: list[Any], store: Any, lam: float | None = None
) -> dict[str, Any]:
    """Score every pair through the engine; several specs = an ensemble of their heads (side by side)."""
    from training.scoring import EngineScorer

    items = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    cols, names, enc_s, score_s = [], [], 0.0, 0.0
    lam_model = None
    for spec in specs:
        scorer = EngineScorer(spec, store)
        t0 = time.perf_counter()
        enc = scorer.encode(items)
        t1 = time.perf_counter()
        cols.append(scorer.score_encoded(enc))
        score_s += time.perf_counter() - t1
        enc_s += t1 - t0
        prefix = f"{spec}/" if len(specs) > 1 else ""
        names += [prefix + n for n in scorer.head_names]
        lam_model = lam_model if lam_model is not None else scorer.rm.manifest.uwo_lambda
    r = torch.cat(cols, dim=1)
    n = len(pairs)
    report = {"model": ",".join(specs), **metrics(r[:n], r[n:], names, lam if lam is not None else lam_model)}
    report["throughput_items_per_s"] = len(items) / max(score_s + enc_s, 1e-9)
    report["forward_items_per_s"] = len(items) / max(score_s, 1e-9)
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        report["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [f"model {report['model']}  pairs {report['pairs']}  uwo lambda {report['uwo_lambda']}"]
    w = max(16, *(len(n) + 5 for n in report["accuracy_per_head"]))
    lines.append(f"{'':{w}s} {'accuracy':>9s} {'ECE':>7s}")
    for n, a in report["accuracy_per_head"].items():
        lines.append(f"{'head ' + n:{w}s} {a:9.4f} {report['ece_per_head'][n]:7.4f}")
    for a, v in report["accuracy"].items():
        lines.append(f"{a:{w}s} {v:9.4f} {report['ece'][a]:7.4f}")
    for name, rel in report["reliability"].items():
        lines.append(f"ECE of {name:9s} of per-head probabilities: {rel['ece']:.4f}")
    hc, au = report.get("head_correlation"), report.get("disagreement_auroc_misranked")
    lines.append(f"head correlation {hc if hc is None else round(hc, 4)}   disagreement AUROC for a misranked pair "
                 f"{au if au is None else round(au, 4)}")  # fmt: skip
    lines.append(
        f"throughput {report['throughput_items_per_s']:.0f} items/s (forward only "
        f"{report['forward_items_per_s']:.0f})   peak RSS {report['peak_rss_mib']:.0f} MiB"
    )
    return "\n".join(lines)


def write_report(report: dict[str, Any], output: Path) -> tuple[Path, Path]:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    png = output.with_suffix(".png")
    plot_reliability(report, png)
    report = {**report, "reliability_png": png.name}
    output.write_text(json.dumps(report, indent=2) + "\n")
    return output, png
