"""The one place training tokenizes: the engine's own policy (`model_store.tokenization`: typed item,
chat template, truncation), so train and serve see the same ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model_store.manifest import RewardManifest
from model_store.tokenization import Item, ItemError
from model_store.tokenization import ItemTokenizer as _Policy


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: bool


class ItemTokenizer:
    """`encode({"prompt", "response"} | {"messages"} | {"text"})` -> ids, as the engine encodes for scoring."""

    def __init__(self, tokenizer: Any, manifest: RewardManifest, max_position_embeddings: int | None = None):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # The engine passes model_max_length=config.max_position_embeddings; so must training.
        self._policy = _Policy(tokenizer, manifest, model_max_length=max_position_embeddings)

    def encode(self, item: dict[str, Any]) -> Encoded:
        e = self._policy.encode(Item(**item))
        return Encoded(list(e.input_ids), e.token_type_ids, e.truncated)


def item_error_types() -> tuple[type[Exception], ...]:
    """Exceptions that mean 'this item cannot be tokenized' (a data error, reported with its line)."""
    return (ItemError,)
