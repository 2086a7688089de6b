"""Score through the scoring engine (the path production uses): the one place training touches it.

Eval and the experiment must measure what is served (normalisation folded into the heads, pooling
from the mask, the fused head kernel), so they score with `ScoringEngine` rather than a training
forward. Imported lazily; only this module builds an engine in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model_store.loader import load_reward_model
from model_store.store import ModelStore
from model_store.tokenization import Item


class EngineScorer:
    """A loaded model + engine; `encode` once, `score_encoded` many times (same tokenizer)."""

    def __init__(
        self, spec: str | Path, store: ModelStore, *, token_budget: int = 65536, max_batch: int = 2048
    ):
        from scoring.batching import BatchPolicy
        from scoring.engine import ScoringEngine

        self.rm = load_reward_model(str(spec), store)
        # Large batches for the experiment's tiny models; the padding cap stays the device default.
        policy = BatchPolicy.resolve(
            str(self.rm.model.device), token_budget=token_budget, max_batch_size=max_batch
        )
        self.engine = ScoringEngine(self.rm, policy=policy)

    @property
    def head_names(self) -> list[str]:
        return self.engine.head_names

    def encode(self, items: list[dict[str, Any]]) -> list[Any]:
        return [self.engine.encode(Item(**it)) for it in items]

    def score_encoded(self, encoded: list[Any]) -> torch.Tensor:
        """[N, K] normalised rewards, as the service returns them."""
        scores = self.engine.score_encoded(encoded)
        return torch.tensor([s.rewards for s in scores], dtype=torch.float32)

    def score(self, items: list[dict[str, Any]]) -> torch.Tensor:
        return self.score_encoded(self.encode(items))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.rm.model.parameters())

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.rm.model.parameters())
