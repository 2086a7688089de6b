"""The one place training tokenizes: exactly the engine's policy, so train and serve see the same ids.

Until the typed item + tokenization policy moves out of `service/engine.py` into a service-free
module, this adapter borrows the engine's encode path without building a full engine (no forward,
no self-check). When it moves, only this file changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model_store.manifest import RewardManifest


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: bool


class ItemTokenizer:
    """`encode({"prompt", "response"} | {"messages"} | {"text"})` -> ids, as `ScoringEngine.encode`."""

    def __init__(self, tokenizer: Any, manifest: RewardManifest, max_position_embeddings: int | None = None):
        from service.engine import ScoringEngine  # temporary: the policy still lives in the engine

        eng = object.__new__(ScoringEngine)
        eng.tokenizer = tokenizer
        eng.manifest = manifest
        eng.max_length = min(manifest.max_length, max_position_embeddings or 10**9)
        eng.truncation_side = manifest.truncation_side
        eng._special_ids = set(tokenizer.all_special_ids)
        eng.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._engine = eng
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, item: dict[str, Any]) -> Encoded:
        e = self._engine.encode(item)
        return Encoded(list(e.input_ids), e.token_type_ids, e.truncated)


def item_error_types() -> tuple[type[Exception], ...]:
    """Exceptions that mean 'this item cannot be tokenized' (a data error, reported with its line)."""
    from service.engine import ItemError

    return (ItemError,)
