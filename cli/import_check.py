"""What `hydra-rm models import` checks before a version becomes visible in the store.

An outside attack imported a checkpoint with flipped bytes inside `model.safetensors` (header intact):
the store accepted it and `serve` answered reward 0.0, heads [0, 0, 0, 0], for every input. A missing
`tokenizer.json` or a truncated weights file were accepted too and failed only at serve time. So the
import loads the copy that is about to be published exactly as `serve` will (same loader, same
`ScoringEngine`, whose constructor runs the serve-time self-check against the model's own forward),
then scores a few clearly different probe inputs: non-finite rewards are refused, and a head that gives
every probe the same reward is refused unless the operator overrides it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from model_store import ModelStore, ModelStoreError
from model_store.loader import load_reward_model
from scoring.engine import Item, ItemError, ScoringEngine
from scoring.settings import Settings

log = logging.getLogger("hydra_rm.import")

# Clearly different inputs, in every item form: a working reward head cannot give them all the same value.
PROBES: tuple[Item, ...] = (
    Item(prompt="What is the capital of France?", response="The capital of France is Paris."),
    Item(prompt="What is the capital of France?", response="I don't know, maybe bananas."),
    Item(text="The quick brown fox jumps over the lazy dog."),
    Item(text="1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16"),
    Item(
        messages=[
            {"role": "user", "content": "Write a haiku about rain."},
            {"role": "assistant", "content": "Soft rain on the roof, the garden drinks slowly, clouds hum."},
        ]
    ),
    Item(text="!!!"),
    Item(text="yes"),  # a few tokens: still probes a model with a tiny max_length under `reject`
    Item(text="no"),
)
# A head is "constant" when its rewards over the probes spread less than this, relative to their size.
CONSTANT_RTOL = 1e-6


class ImportRefused(ModelStoreError):
    """The checkpoint would not serve correctly; nothing was published."""


@dataclass(frozen=True)
class ImportCheck:
    """What the check saw: the probe rewards per head (for the operator's log)."""

    head_names: list[str]
    spreads: list[float]
    constant_heads: list[str]


def constant_heads(rewards: list[list[float]], head_names: list[str]) -> tuple[list[float], list[str]]:
    """Per head: the spread (max - min) of its rewards over the probes, and the heads that do not move."""
    spreads, constant = [], []
    for h, name in enumerate(head_names):
        column = [r[h] for r in rewards]
        spread = max(column) - min(column)
        spreads.append(spread)
        if spread <= CONSTANT_RTOL * max(1.0, max(abs(v) for v in column)):
            constant.append(name)
    return spreads, constant


def check_importable(
    directory: Path, settings: Settings, *, allow_pickle: bool = False, allow_constant: bool = False
) -> ImportCheck:
    """Load `directory` as `serve` would, run the serve-time self-check and the probes; raise
    ImportRefused with the reason when it would not serve correctly."""
    try:
        rm = load_reward_model(
            str(directory),
            ModelStore(settings.store_root),
            allow_pickle=allow_pickle,
            trust_remote_code=settings.trust_remote_code,
            device=settings.resolved_device(),
            dtype=settings.resolved_dtype(),
            verify=False,  # the store has just checksummed this very copy
        )
    except ModelStoreError as e:
        raise ImportRefused(f"the checkpoint does not load: {e}") from e
    try:
        engine = ScoringEngine(  # the constructor runs the same self-check as `serve`
            rm,
            policy=settings.batch_policy(),
            padding_side=settings.padding_side,
            max_length=settings.max_length,
            truncation_side=settings.truncation_side,
        )
    except ModelStoreError as e:
        raise ImportRefused(f"the serve-time self-check failed: {e}") from e
    encoded = []
    for probe in PROBES:
        try:
            encoded.append(engine.encode(probe))
        except ItemError:  # e.g. over max_length under truncation_side=reject: that is the caller's 422
            continue
    if len(encoded) < 2:
        raise ImportRefused(
            f"only {len(encoded)} of {len(PROBES)} probe inputs could be encoded "
            f"(max_length={engine.max_length}, truncation_side={engine.truncation_side}): cannot check the heads"
        )
    try:
        scores = engine.score_encoded(encoded)
    except Exception as e:  # noqa: BLE001 - any failure here would be a failure on every request
        raise ImportRefused(f"scoring the probe inputs failed: {type(e).__name__}: {e}") from e
    rewards = [s.rewards for s in scores]
    if not all(math.isfinite(v) for r in rewards for v in r):
        raise ImportRefused(
            "the model gives non-finite rewards (NaN or inf) to ordinary probe inputs: corrupted weights?"
        )
    names = engine.head_names
    spreads, constant = constant_heads(rewards, names)
    if constant:
        values = ", ".join(f"{n}={rewards[0][names.index(n)]:.6g}" for n in constant[:8])
        message = (
            f"head(s) {', '.join(constant)} give the same reward ({values}) to all {len(encoded)} "
            "clearly different probe inputs: the weights look broken (zeroed or corrupted tensors)"
        )
        if not allow_constant:
            raise ImportRefused(f"{message}; pass --allow-constant-rewards to import it anyway")
        log.warning("%s; importing anyway (--allow-constant-rewards)", message)
    return ImportCheck(head_names=names, spreads=spreads, constant_heads=constant)
