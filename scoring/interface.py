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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from model_store.manifest import RewardManifest
from model_store.tokenization import EncodedItem, Item, ItemTokenizer
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
