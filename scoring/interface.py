"""The engine's public interface: what the service, the jobs and training need of an engine, and what
a second engine (e.g. one backed by vLLM) implements to stand in for `ScoringEngine`.

Consumers type against `Engine`, never against the torch class; only the code that builds an engine
(`build_engine`, the import check, training's scorer) names `ScoringEngine`.

Contract, held by tests/scoring/test_interface.py for the torch engine:
- `encode` tokenizes one item with model_store's `ItemTokenizer` (`items`), truncating per
  `max_length` / `truncation_side`; a bad item raises `ItemError` naming its field.
- `forward` scores one batch planned by `policy` (`policy.plan_items`), results in batch order. The
  service's batcher calls it on its single forward thread, the JSONL job inline: never two at once.
  It may raise; callers isolate failures by bisecting the batch (`scoring.batching.forward_isolating`).
  A row may hold non-finite rewards; callers decide (`scoring.results`).
- `score` is encode + plan + forward for a list, results in input order.
- `warmup` runs one real forward so the first request does not pay for lazy initialisation.
- `describe` returns the model card's engine facts: at least `name`, `version`, `num_heads`,
  `head_names`, `max_length`, `truncation_side`, `device`.
- `fingerprint` returns what identifies the rewards this engine gives (weights, dtype, the settings
  that change rewards), JSON-serialisable: a resumed job refuses to mix two engines' rewards.
- optional `novelty`: the statistic it computes u with (None or absent: no u). An engine that cannot
  compute a model's statistic says why in `novelty_unavailable`; `served_novelty` and
  `require_served` are what every consumer asks, so `lcb` is refused upfront, never per item.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from model_store.aggregation import Aggregation
from model_store.manifest import RewardManifest
from model_store.tokenization import EncodedItem, Item, ItemTokenizer
from model_store.uncertainty import NoveltyInfo
from scoring.batching import BatchPolicy
from scoring.results import ItemScore


@runtime_checkable
class Engine(Protocol):
    manifest: RewardManifest
    items: ItemTokenizer
    policy: BatchPolicy
    max_length: int
    truncation_side: str

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def num_heads(self) -> int: ...

    @property
    def head_names(self) -> list[str]: ...

    def encode(self, item: Item) -> EncodedItem: ...

    def forward(self, batch: Sequence[EncodedItem]) -> list[ItemScore]: ...

    def score(self, items: Iterable[Item]) -> list[ItemScore]: ...

    def warmup(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def fingerprint(self) -> dict[str, Any]: ...


def served_novelty(engine: Engine) -> NoveltyInfo | None:
    """The model's novelty statistic if this engine computes u with it, else None."""
    return engine.manifest.novelty if getattr(engine, "novelty", None) is not None else None


def novelty_unavailable(engine: Engine) -> str | None:
    """Why a model's novelty statistic is not served (None: it is, or the model has none)."""
    if engine.manifest.novelty is None or served_novelty(engine) is not None:
        return None
    return getattr(engine, "novelty_unavailable", None) or f"{type(engine).__name__} does not compute it"


def require_served(agg: Aggregation, engine: Engine) -> Aggregation:
    """`agg`, bound to the model's units, if this engine can compute it; ValueError for `lcb` where u is
    not computed (bound with the manifest's statistic it would fail on every item instead)."""
    reason = novelty_unavailable(engine)
    if agg.kind == "lcb" and reason is not None:
        raise ValueError(f"`lcb` needs the model's novelty statistic, which is not served: {reason}")
    return agg
