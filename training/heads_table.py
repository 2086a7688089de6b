"""The pretrained-heads table (issue 17): accuracy, head correlation and what disagreement / novelty
detect, for models trained by `hydra-rm train` (full fine-tune), scored through the service engine.

Rewards come from the engine (what is served); the pooled features for u (issue 21) come from the
trained HF model's own pooler (the row the heads read), u fitted on the training split's items.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from training.evaluate import auroc
from training.novelty_standin import fit_novelty, novelty
from training.shift import KINDS, shifted


@torch.no_grad()
def pooled_features(model_dir: Path, items: list[dict[str, Any]], batch_size: int = 64) -> torch.Tensor:
    """[N, H] pooler output of a BERT-like checkpoint for items tokenized as training tokenizes them.
    Stand-in for `ScoringEngine.pooled_features` (novelty branch) until the coordinator merges it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from model_store.manifest import RewardManifest
    from training.model import RewardForward
    from training.tokens import ItemTokenizer
    from training.trainer import collate

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = ItemTokenizer(
        AutoTokenizer.from_pretrained(model_dir),
        RewardManifest.read(model_dir),
        getattr(model.config, "max_position_embeddings", None),
    )
    feats: list[torch.Tensor] = []
    hook = model.classifier.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
    enc = [tok.encode(it) for it in items]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
    out = torch.empty(len(enc), model.config.hidden_size)
    fwd = RewardForward(model).eval()
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        feats.clear()
        fwd(**collate([enc[i] for i in idx], tok.pad_id))
        out[idx] = feats[0].float()
    hook.remove()
    return out


def shift_items(held: list[Any], n: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Shifted responses of each kind, under the held-out pairs' prompts (cycled) when they have one."""
    responses = [p.chosen.get("response", p.chosen.get("text", "")) for p in held]
    out = {}
    for kind in KINDS:
        texts = shifted(kind, n, seed, responses)
        out[kind] = [
            {"prompt": held[i % len(held)].chosen["prompt"], "response": t}
            if "prompt" in held[i % len(held)].chosen
            else {"text": t}
            for i, t in enumerate(texts)
        ]
    return out


def table_row(
    model_dirs: list[Path], train: list[Any], held: list[Any], shifts: dict[str, list[dict[str, Any]]],
    store: Any, lam: float = 1.0,
) -> dict[str, Any]:  # fmt: skip
    """One row: several dirs = a full ensemble (one head each, side by side)."""
    from training.scoring import EngineScorer

    held_items = [p.chosen for p in held] + [p.rejected for p in held]
    shift_all = [it for k in KINDS for it in shifts[k]]
    items = held_items + shift_all
    train_items = [p.chosen for p in train] + [p.rejected for p in train]
    cols, us = [], []
    for d in model_dirs:
        cols.append(EngineScorer(d, store).score(items))
        stat = fit_novelty(pooled_features(d, train_items), lam)
        u = novelty(pooled_features(d, items), stat)
        us.append(u / u[: len(held_items)].median())
    r = torch.cat(cols, 1)
    u = torch.stack(us).mean(0).float()
    n = len(held)
    k = r.shape[1]
    margin = r[:n] - r[n : 2 * n]
    row: dict[str, Any] = {
        "accuracy_min": float((r[:n].min(1).values > r[n : 2 * n].min(1).values).double().mean()),
        "accuracy_mean": float((margin.mean(1) > 0).double().mean()),
        "accuracy_per_head_min": float((margin > 0).double().mean(0).min()),
    }
    hn = 2 * n
    if k > 1:
        c = torch.corrcoef(r[:hn].T.double())
        row["head_corr"] = float((c.sum() - c.diagonal().sum()) / (k * (k - 1)))
    misranked = margin.mean(1) <= 0
    row["errors"] = int(misranked.sum())
    signals = {"u": u} | ({"std": r.std(1, correction=0)} if k > 1 else {})
    for name, s in signals.items():
        row[f"{name}_misranked"] = auroc((s[:n] + s[n:hn]) / 2, misranked)
        lab = torch.cat([torch.zeros(hn, dtype=torch.bool), torch.ones(len(shift_all), dtype=torch.bool)])
        row[f"{name}_shift"] = auroc(s, lab)
        start = hn
        for kind in KINDS:
            m = len(shifts[kind])
            sel = torch.cat([torch.arange(hn), torch.arange(start, start + m)])
            row[f"{name}_shift_{kind}"] = auroc(s[sel], lab[sel])
            start += m
    mean_r = r.mean(1)
    start = hn
    row["reward_heldout"] = float(mean_r[:hn].mean())
    for kind in KINDS:
        m = len(shifts[kind])
        row[f"reward_{kind}"] = float(mean_r[start : start + m].mean())
        start += m
    return row
