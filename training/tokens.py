"""The one place training tokenizes: exactly the engine's policy, so train and serve see the same ids.

The policy (typed item, chat template, truncation) is moving out of `service/engine.py` into the
service-free `model_store.tokenization`; this adapter uses that module when it exists and, until
then, borrows the engine's encode path without building a full engine (no forward, no self-check).
Only this file knows which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model_store.manifest import RewardManifest

try:  # after the service refactor: the policy without the service
    from model_store.tokenization import Item as _Item
    from model_store.tokenization import ItemError as _ItemError
    from model_store.tokenization import ItemTokenizer as _Policy
except ImportError:  # pragma: no cover - exercised on branches that predate model_store.tokenization
    _Item = _ItemError = _Policy = None  # type: ignore[assignment,misc]


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: bool


class ItemTokenizer:
    """`encode({"prompt", "response"} | {"messages"} | {"text"})` -> ids, as the engine encodes for scoring."""

    def __init__(self, tokenizer: Any, manifest: RewardManifest, max_position_embeddings: int | None = None):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if _Policy is not None:
            self._policy = _Policy(tokenizer, manifest, model_max_length=max_position_embeddings)
            self._encode = lambda item: self._policy.encode(_Item(**item))
            return
        from service.engine import ScoringEngine  # the policy still lives in the engine on this branch

        eng = object.__new__(ScoringEngine)
        eng.tokenizer = tokenizer
        eng.manifest = manifest
        eng.max_length = min(manifest.max_length, max_position_embeddings or 10**9)
        eng.truncation_side = manifest.truncation_side
        eng._special_ids = set(tokenizer.all_special_ids)
        eng.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._encode = eng.encode

    def encode(self, item: dict[str, Any]) -> Encoded:
        e = self._encode(item)
        return Encoded(list(e.input_ids), e.token_type_ids, e.truncated)


def item_error_types() -> tuple[type[Exception], ...]:
    """Exceptions that mean 'this item cannot be tokenized' (a data error, reported with its line)."""
    if _ItemError is not None:
        return (_ItemError,)
    from service.engine import ItemError

    return (ItemError,)
