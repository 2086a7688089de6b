"""Train the shipped default model: `python -m training.default_build [--out DIR]`.

Recipe: the default architecture (Llama-style, hidden 128, 2 layers, chat template; tokenizer trained
on the shipped corpus plus toy reviews from a seed used nowhere else), K=4 heads trained with the
disjoint-shard recipe on 4,000 VADER-labelled review pairs (10% of labels flipped), reference split =
400 separate pairs; then accuracy against noise-free gold labels on 1,000 fresh test pairs, scored
through the engine and written into the manifest's provenance. The trainer also fits the novelty
statistic (training responses; quantiles on the reference split). `--novelty-only` fits just that on
the shipped weights, as the trainer would, without retraining them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from model_store.default_model import HEAD_NAMES, build_default_model, shipped_default_dir
from model_store.loader import load_reward_model
from model_store.manifest import RewardManifest, attach_novelty
from model_store.novelty import DEFAULT_LAMBDA, NoveltyInfo
from model_store.store import ModelStore
from training.calibrate import engine_for, fit_for_engine
from training.data import parse_pair, response_items
from training.evaluate import metrics
from training.scoring import EngineScorer
from training.toydata import Generator, preference_rows
from training.trainer import TrainConfig, Trainer, save_model

TRAIN_SEED, REF_SEED, TEST_SEED, TOKENIZER_SEED = 101, 102, 103, 104


def add_novelty(out: Path, *, n_pairs: int = 4000, lam: float = DEFAULT_LAMBDA) -> NoveltyInfo:
    """Fit the novelty statistic into the model at `out` from the recipe's own data, as `hydra-rm
    train` does: Phi = the training pairs' responses, quantiles of u on the reference split's."""
    train = [parse_pair(r, "train") for r in preference_rows(n_pairs, TRAIN_SEED, noise=0.1)]
    ref = [parse_pair(r, "ref") for r in preference_rows(400, REF_SEED, noise=0.1)]
    store = ModelStore(Path(tempfile.gettempdir()) / "hydra-default-build-eval")
    rm = load_reward_model(str(out), store)
    stat, info = fit_for_engine(engine_for(rm), response_items(train), response_items(ref), lam)
    attach_novelty(out, stat, info)  # replaces an earlier statistic's entry and file
    return info


def build(out: Path, *, n_pairs: int = 4000, epochs: int = 2, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    gen = Generator(TOKENIZER_SEED)
    texts = [gen.response(i % 64) for i in range(4000)]
    train = [parse_pair(r, "train") for r in preference_rows(n_pairs, TRAIN_SEED, noise=0.1)]
    ref = [parse_pair(r, "ref") for r in preference_rows(400, REF_SEED, noise=0.1)]
    test = [parse_pair(r, "test") for r in preference_rows(1000, TEST_SEED, noise=0.0)]
    with tempfile.TemporaryDirectory(prefix="hydra-default-build-") as tmp:
        base = build_default_model(Path(tmp) / "arch", seed=seed, extra_texts=texts, head_names=HEAD_NAMES)
        store = ModelStore(Path(tmp) / "store")
        cfg = TrainConfig(
            heads=len(HEAD_NAMES), head_names=HEAD_NAMES, epochs=epochs, seed=seed, lr_encoder=1e-3,
            lr_heads=1e-3, batch_size=32, diversity="shard", head_init_std=0.2, cpu=True, progress=False,
        )  # fmt: skip
        result = Trainer(cfg, train, str(base), store, reference=ref).run()
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            old.unlink()
        save_model(result, out)
    scorer = EngineScorer(out, ModelStore(Path(tempfile.gettempdir()) / "hydra-default-build-eval"))
    r = scorer.score([p.chosen for p in test] + [p.rejected for p in test])
    m = metrics(r[: len(test)], r[len(test) :], HEAD_NAMES, lam=0.5)
    test_metrics = {
        "test_pairs": len(test),
        "test_labels": "noise-free VADER gold",
        "test_accuracy_per_head": m["accuracy_per_head"],
        "test_accuracy": m["accuracy"],
        "test_head_correlation": m["head_correlation"],
    }
    manifest = RewardManifest.read(out)
    assert manifest is not None
    prov = dict(manifest.provenance or {})
    prov["metrics"] = {**prov.get("metrics", {}), **test_metrics}
    prov["data"] = (
        f"training.toydata.preference_rows({n_pairs}, seed={TRAIN_SEED}, noise=0.1); reference "
        f"preference_rows(400, seed={REF_SEED}, noise=0.1); test preference_rows(1000, seed={TEST_SEED}, noise=0)"
    )
    prov["command"] = "python -m training.default_build"
    manifest.model_copy(
        update={
            "provenance": prov,
            "description": "hydra-rm embedded default: 4 review-sentiment heads (disjoint-shard recipe, "
            "VADER-labelled offline reviews); a demo model, not a general-purpose reward model",
        }
    ).write(out)
    return {**result.metrics, **test_metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=shipped_default_dir())
    ap.add_argument(
        "--novelty-only", action="store_true", help="fit only the novelty statistic, keep the weights"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.novelty_only:
        print(add_novelty(args.out).model_dump_json(indent=2))
        return
    print(json.dumps(build(args.out), indent=2))


if __name__ == "__main__":
    main()
