"""Fit the feature-space novelty statistic for a model: after `hydra-rm train`, or for any served model
(`hydra-rm calibrate`, a bolt-on uncertainty for reward models hydra-rm did not train).

The features are the engine's own (`ScoringEngine.pooled_features`: the row the heads read, pooled
from the mask, through the same tokenizer and truncation as serving), so u at serve time is u here.
The quantiles come from rows the matrix was not fitted on: in-sample u is biased low.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model_store.loader import RewardModel, load_reward_model
from model_store.manifest import MANIFEST_NAME, attach_novelty
from model_store.novelty import (
    DEFAULT_LAMBDA,
    NoveltyInfo,
    NoveltyStat,
    describe,
    fit_novelty,
    novelty,
)
from model_store.store import ModelStore
from model_store.tokenization import Item

DEFAULT_HOLDOUT = 0.2


def engine_for(rm: RewardModel) -> Any:
    """An in-process engine over `rm` with the batch policy calibration uses (big batches, no server)."""
    from scoring.batching import BatchPolicy
    from scoring.engine import ScoringEngine

    device = str(next(rm.model.parameters()).device)
    return ScoringEngine(rm, policy=BatchPolicy.resolve(device, token_budget=16384, max_batch_size=256))


def fit_for_engine(
    engine: Any,
    fit_items: Sequence[Item],
    quantile_items: Sequence[Item],
    lam: float = DEFAULT_LAMBDA,
    rank: int | None = None,
) -> tuple[NoveltyStat, NoveltyInfo]:
    """The statistic from `fit_items`' pooled features; quantiles of u and the reward scale of `lcb`
    (std of the mean-over-heads reward) from `quantile_items`."""
    if not fit_items or not quantile_items:
        raise ValueError("need at least one item to fit the novelty statistic on and one for its quantiles")
    phi = engine.pooled_features([engine.encode(it) for it in fit_items])
    stat = fit_novelty(phi, lam, rank=rank)
    encoded = [engine.encode(it) for it in quantile_items]
    u = novelty(engine.pooled_features(encoded), stat).tolist()
    means = torch.tensor([s.mean for s in engine.score_encoded(encoded)], dtype=torch.float64)
    reward_std = float(means.std(correction=0)) if len(means) > 1 else 1.0
    return stat, describe(stat, u, reward_std if reward_std > 0 else 1.0, engine.head.kind)


def split_items(items: Sequence[Item], holdout: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Seeded (fit, quantile) split; at least one item on each side."""
    if len(items) < 2:
        raise ValueError("calibration needs at least 2 texts (one to fit on, one for the quantiles)")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    n_q = min(len(items) - 1, max(1, round(len(items) * holdout)))
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in sorted(perm[n_q:])], [items[i] for i in sorted(perm[:n_q])]


def read_items(path: Path) -> list[Item]:
    """JSONL of items in any of the API's forms (`text`, `prompt`+`response`, `messages`), or of
    preference pairs ({prompt, chosen, rejected}: both responses are reference items)."""
    from scoring.items import ScoreItem

    items: list[Item] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if isinstance(row, dict) and "chosen" in row and "rejected" in row:
                    from training.data import parse_pair, response_items

                    items += response_items([parse_pair(row, f"line {lineno}")])
                else:
                    items.append(ScoreItem.model_validate(row).to_item())
            except Exception as e:  # noqa: BLE001 - any bad line is the user's to fix, named by number
                raise ValueError(f"{path}:{lineno}: not an item or a preference pair: {e}") from e
    return items


def calibrate(
    spec: str,
    data: Path,
    store: ModelStore,
    *,
    name: str | None = None,
    lam: float = DEFAULT_LAMBDA,
    holdout: float = DEFAULT_HOLDOUT,
    seed: int = 0,
    rank: int | None = None,
    check: Any = None,
) -> tuple[Any, NoveltyInfo]:
    """Fit the statistic for model `spec` (store name, directory or hub id) on the texts in `data` and
    publish the model with it as a new version of `name` (default: the store name it came from).
    Versions are immutable, so this never edits one; `check` runs on the copy before it is published."""
    rm = load_reward_model(spec, store)
    target = name or (rm.name if store.contains(rm.name) else None)
    if target is None:
        raise ValueError(f"{spec!r} is not in the store: give --name to publish the calibrated copy under")
    fit_items, q_items = split_items(read_items(data), holdout, seed)
    stat, info = fit_for_engine(engine_for(rm), fit_items, q_items, lam, rank)
    with tempfile.TemporaryDirectory(prefix="hydra-calibrate-") as tmp:
        copy = Path(tmp) / "model"
        shutil.copytree(rm.path, copy, ignore=shutil.ignore_patterns(".*", MANIFEST_NAME))
        # The loaded manifest (the default one for a checkpoint without) minus stale checksums.
        rm.manifest.model_copy(update={"files": {}, "novelty": None}).write(copy)
        attach_novelty(copy, stat, info)
        ref = store.publish(copy, target, check=check)
    return ref, info


def novelty_for_training(
    model: Any,
    tokenizer: Any,
    manifest: Any,
    train_items: Sequence[Item],
    reference_items: Sequence[Item],
    lam: float = DEFAULT_LAMBDA,
    branches: Any = None,
) -> tuple[NoveltyStat, NoveltyInfo]:
    """`hydra-rm train`'s statistic: fitted on the training pairs' responses, quantiles on the reference
    split, through an engine over the freshly trained model (in memory, exactly as it will be served)."""
    rm = RewardModel(
        model=model, tokenizer=tokenizer, manifest=manifest, name="train", version="train", path=Path("."),
        branches=branches,
    )  # fmt: skip
    return fit_for_engine(engine_for(rm), train_items, reference_items, lam)
