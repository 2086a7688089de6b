"""What every engine does the same way around its own `forward`: tokenize with model_store's
`ItemTokenizer`, plan batches with its `BatchPolicy`, score in input order, warm up.

`ScoringEngine` (torch) and `VllmEngine` inherit it and differ only in `forward` (and in their model
facts); the contract they keep is scoring/interface.py's `Engine`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from model_store.manifest import RewardManifest
from model_store.tokenization import EncodedItem, Item, ItemTokenizer
from scoring.batching import BatchPolicy, score_planned
from scoring.results import ItemScore


class PlannedEngine:
    """Mixin: `encode`, `score_encoded`, `score`, `warmup` and the head facts over a subclass's
    `manifest`, `items`, `policy` and `forward`."""

    manifest: RewardManifest
    items: ItemTokenizer
    policy: BatchPolicy

    def forward(self, batch: Sequence[EncodedItem]) -> list[ItemScore]:
        raise NotImplementedError

    @property
    def num_heads(self) -> int:
        return self.manifest.num_heads

    @property
    def head_names(self) -> list[str]:
        return list(self.manifest.head_names)

    def encode(self, item: Item) -> EncodedItem:
        """Tokenize and truncate per the model's policy (model_store/tokenization.py)."""
        return self.items.encode(item)

    def score_encoded(self, encoded: Sequence[EncodedItem]) -> list[ItemScore]:
        """Batches planned by `self.policy`; results in input order."""
        return score_planned(self.forward, self.policy, encoded)

    def score(self, items: Iterable[Item]) -> list[ItemScore]:
        return self.score_encoded([self.encode(it) for it in items])

    def warmup(self) -> None:
        """One real forward so the first request does not pay for lazy initialisation (for vLLM it
        also checks that the classifier has the manifest's K outputs)."""
        self.score([Item(text="warm up the reward model")])
