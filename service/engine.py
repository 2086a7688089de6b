"""Scoring engine: tokenize -> one encoder pass per batch -> all K heads via the fused kernel.

Invariants the tests hold us to:
- a reward equals the Hugging Face model's own logits for that head (1e-5, fp32);
- a reward does not depend on its batch: padding, batch size and neighbours change nothing beyond
  float rounding. So the pooled position comes from the attention mask (never from pad ids), and
  decoders get explicit position ids so left padding does not shift RoPE positions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from kernels import multihead_reward
from model_store.errors import ModelStoreError
from model_store.loader import RewardModel
from model_store.manifest import HeadNormalization
from model_store.tokenization import EncodedItem, Item, ItemError, ItemTokenizer
from service.batching import BatchPolicy
from service.prefix import PrefixScorer

log = logging.getLogger("hydra_rm.engine")

__all__ = ["EncodedItem", "Item", "ItemError", "ItemScore", "ScoringEngine"]

PoolKind = Literal["last_token", "first_token", "pooler", "cls_head"]


@dataclass
class ItemScore:
    rewards: list[float]
    min: float
    max: float
    mean: float
    std: float
    tokens: int
    truncated: bool

    def summary(self) -> dict[str, Any]:
        """The per-item fields every output format (HTTP, JSONL) reports beside the heads."""
        return {
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": self.std,
            "tokens": self.tokens,
            "truncated": self.truncated,
        }


@dataclass(frozen=True)
class _Head:
    kind: PoolKind
    linear: nn.Linear
    pre: nn.Module | None = None  # RoBERTa-style dense+tanh before the final projection


def _resolve_head(model: nn.Module, pooling: str) -> _Head:
    """Find the K-way linear layer and how its input is pooled, for the architectures we verify."""
    score = getattr(model, "score", None)
    classifier = getattr(model, "classifier", None)
    if isinstance(score, nn.Linear):  # Llama/Qwen/Mistral/Gemma/GPT-2 style: last real token
        if pooling == "pooler":
            raise ModelStoreError("manifest asks for pooling=pooler but this decoder has no pooler")
        kind: PoolKind = "last_token" if pooling in {"auto", "last_token"} else pooling  # type: ignore[assignment]
        return _Head(kind, score)
    if isinstance(classifier, nn.Linear):
        base = model.base_model
        has_pooler = getattr(base, "pooler", None) is not None or getattr(model, "pooler", None) is not None
        if pooling in {"auto", "pooler"} and has_pooler:
            return _Head("pooler", classifier)
        if pooling == "pooler":
            raise ModelStoreError("manifest asks for pooling=pooler but the model has no pooler")
        return _Head("last_token" if pooling == "last_token" else "first_token", classifier)
    if classifier is not None and isinstance(getattr(classifier, "out_proj", None), nn.Linear):
        return _Head("cls_head", classifier.out_proj, pre=classifier.dense)  # RoBERTa family
    raise ModelStoreError(
        f"unsupported architecture {type(model).__name__}: hydra-rm needs a sequence-classification model "
        "whose head is `score` (decoders), `classifier` (BERT/DeBERTa) or `classifier.out_proj` (RoBERTa)"
    )


def fold_heads(
    weight: torch.Tensor, bias: torch.Tensor | None, normalization: HeadNormalization | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold per-head normalisation into head weights once, in fp32: (Wx + b - mu) / sigma.

    The one definition of per-head normalisation: the torch engine folds it into the model's head;
    the vLLM engine, which gets the K raw logits, folds it into an identity head."""
    w = weight.detach().to(torch.float32)
    b = bias.detach().to(torch.float32) if bias is not None else torch.zeros(w.shape[0], device=w.device)
    if normalization is not None:
        mean = torch.tensor(normalization.mean, dtype=torch.float32, device=w.device)
        std = torch.tensor(normalization.std, dtype=torch.float32, device=w.device)
        w = w / std[:, None]
        b = (b - mean) / std
    return w, b


def _allow_tf32() -> None:
    """fp32 encoders on CUDA run their matmuls on TF32 tensor cores (10-bit mantissa products,
    fp32 accumulation: ~1e-3 relative on logits, the tolerance the engine's self-check allows fp16/
    bf16; an A100/H100 does ~8x the FLOP/s). Process-wide, so set only when a CUDA engine loads."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log.info("CUDA engine: TF32 matmuls allowed for fp32 weights")


def _to_host(res: Any) -> list[list[float]]:
    """All outputs in one device-to-host transfer: rows of [K rewards, min, max, mean, std].

    Five separate `.cpu()` calls were five synchronising copies per batch on CUDA."""
    packed = torch.cat([res.rewards, torch.stack([res.min, res.max, res.mean, res.std], dim=1)], dim=1)
    return packed.cpu().tolist()


def item_scores(res: Any, batch: Sequence[EncodedItem]) -> list[ItemScore]:
    """One ItemScore per row of a kernel result (plain and shared-prefix forwards alike)."""
    k = res.rewards.shape[1]
    return [
        ItemScore(r[:k], r[k], r[k + 1], r[k + 2], r[k + 3], e.n_tokens, e.truncated)
        for r, e in zip(_to_host(res), batch, strict=True)
    ]


class ScoringEngine:
    """Scores items with one shared encoder and K heads; thread-compatible (one forward at a time)."""

    def __init__(
        self,
        rm: RewardModel,
        *,
        policy: BatchPolicy | None = None,
        padding_side: Literal["right", "left"] = "right",
        max_length: int | None = None,
        truncation_side: str | None = None,
    ) -> None:
        self.rm = rm
        self.model = rm.model
        self.tokenizer = rm.tokenizer
        self.manifest = rm.manifest
        self.device = next(self.model.parameters()).device
        if self.device.type == "cuda":
            _allow_tf32()
        # How `score` batches; the service's batcher and the JSONL job plan with this same policy.
        self.policy = policy or BatchPolicy.resolve(str(self.device))
        model_max = getattr(self.model.config, "max_position_embeddings", None)
        self.items = ItemTokenizer(
            self.tokenizer,
            self.manifest,
            max_length=max_length,
            truncation_side=truncation_side,
            model_max_length=model_max,
        )
        self.max_length = self.items.max_length
        self.truncation_side = self.items.truncation_side
        self.head = _resolve_head(self.model, self.manifest.pooling)
        self.is_decoder = self.head.kind == "last_token"
        # Encoders pool at position 0 (CLS) and use absolute positions: they must be right-padded.
        self.padding_side = padding_side if self.is_decoder else "right"
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.has_chat_template = self.items.has_chat_template
        self.weight, self.bias = self._fold_heads()
        if self.head.kind == _resolve_head(self.model, "auto").kind:  # an explicit override has no HF twin
            self._self_check()
        # Shared prompts encoded once, duplicates scored once (service/prefix.py); the batch plan only
        # keeps prefix groups together where this model can really share.
        self.prefix = PrefixScorer(self, enabled=self.policy.prefix_sharing)
        if self.policy.prefix_sharing and not self.prefix.sharing:
            self.policy = replace(self.policy, prefix_sharing=False)

    # -- model facts -----------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return self.manifest.num_heads

    @property
    def head_names(self) -> list[str]:
        return list(self.manifest.head_names)

    def _fold_heads(self) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = fold_heads(self.head.linear.weight, self.head.linear.bias, self.manifest.normalization)
        # Half-precision encoders keep half-precision head weights (exact when nothing was folded):
        # with both kernel operands in bf16/fp16 the Triton kernel can use tensor cores.
        model_dtype = self.head.linear.weight.dtype
        if model_dtype in (torch.float16, torch.bfloat16):
            w = w.to(model_dtype)
        return w.contiguous(), b.contiguous()

    def _self_check(self) -> None:
        """Refuse an architecture whose head we would reproduce wrongly (e.g. DistilBERT's
        pre_classifier, ELECTRA's GELU head): one probe through our path vs. the model's own forward."""
        ids, types = self.items.tokenize(Item(text="hydra-rm self-check: is this reward the model's own?"))
        cut = slice(0, min(len(ids), self.max_length))  # whatever the truncation policy, probe in range
        probe = EncodedItem(ids[cut], types[cut] if types is not None else None, False, len(ids))
        ours = torch.tensor(self.forward_padded([probe])[0].rewards)
        kw: dict[str, Any] = {"input_ids": torch.tensor([probe.input_ids], device=self.device)}
        if probe.token_type_ids is not None:
            kw["token_type_ids"] = torch.tensor([probe.token_type_ids], device=self.device)
        with torch.inference_mode():
            ref = self.model(**kw).logits[0].float().cpu()
        norm = self.manifest.normalization
        if norm is not None:
            ref = (ref - torch.tensor(norm.mean)) / torch.tensor(norm.std)
        tol = 1e-3 if self.head.linear.weight.dtype == torch.float32 else 5e-2
        if not torch.allclose(ours, ref, atol=tol, rtol=tol):
            raise ModelStoreError(
                f"{type(self.model).__name__} is not supported: hydra-rm's pooling + heads do not reproduce "
                f"the model's own logits (max difference {(ours - ref).abs().max().item():.3g})"
            )

    # -- tokenization ----------------------------------------------------------------------------
    def encode(self, item: Item) -> EncodedItem:
        """Tokenize and truncate per the model's policy (model_store/tokenization.py)."""
        return self.items.encode(item)

    # -- scoring ---------------------------------------------------------------------------------
    def forward(self, batch: Sequence[EncodedItem]) -> list[ItemScore]:
        """Score one planned batch, results in batch order: shared prefixes and duplicates computed
        once (service/prefix.py) unless HYDRA_RM_PREFIX_SHARING=off; equal to `forward_padded`."""
        if self.prefix.enabled:
            return self.prefix.forward(batch)
        return self.forward_padded(batch)

    def forward_padded(self, batch: Sequence[EncodedItem]) -> list[ItemScore]:
        """One encoder pass over `batch` (padded to its longest row); results in batch order."""
        if not batch:
            return []
        n, t = len(batch), max(e.n_tokens for e in batch)
        ids = torch.full((n, t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, t), dtype=torch.long)
        types = torch.zeros((n, t), dtype=torch.long) if batch[0].token_type_ids is not None else None
        for r, e in enumerate(batch):
            sl = slice(t - e.n_tokens, t) if self.padding_side == "left" else slice(0, e.n_tokens)
            ids[r, sl] = torch.tensor(e.input_ids)
            mask[r, sl] = 1
            if types is not None and e.token_type_ids is not None:
                types[r, sl] = torch.tensor(e.token_type_ids)
        ids, mask = self._to_device(ids), self._to_device(mask)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            kwargs["token_type_ids"] = self._to_device(types)
        if self.is_decoder:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            kwargs["use_cache"] = False
        with torch.inference_mode():
            out = self.model.base_model(**kwargs)
            hidden, index = self._pool(out, mask)
            res = multihead_reward(hidden, index, self.weight, self.bias)
        return item_scores(res, batch)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host-to-device from pinned memory, asynchronous on CUDA; pinning is skipped on CPU (where
        there is no copy, and a CPU-only torch cannot pin)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _pool(self, out: Any, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        kind = self.head.kind
        if kind == "pooler":
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:  # DeBERTa keeps its pooler on the task model, not the base model
                pooled = self.model.pooler(out.last_hidden_state)
            return pooled, None
        hidden = out.last_hidden_state
        t = mask.shape[1]
        if kind == "last_token":
            index = (t - 1) - mask.flip(-1).argmax(-1)
        else:
            index = mask.argmax(-1)
        if kind == "cls_head":
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return torch.tanh(self.head.pre(hidden[rows, index])), None
        return hidden, index

    def score_encoded(self, encoded: Sequence[EncodedItem]) -> list[ItemScore]:
        """Batches planned by `self.policy`; results in input order."""
        results: list[ItemScore | None] = [None] * len(encoded)
        for idxs in self.policy.plan_items(encoded):
            for i, s in zip(idxs, self.forward([encoded[i] for i in idxs]), strict=True):
                results[i] = s
        return results  # type: ignore[return-value]

    def score(self, items: Iterable[Item]) -> list[ItemScore]:
        return self.score_encoded([self.encode(it) for it in items])

    def warmup(self) -> None:
        """One real forward so the first request does not pay for lazy initialisation."""
        self.score([Item(text="warm up the reward model")])

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.rm.name,
            "version": self.rm.version,
            "num_heads": self.num_heads,
            "head_names": self.head_names,
            "encoder": self.rm.info.get("model_type"),
            "architecture": self.rm.info.get("architecture"),
            "pooling": self.head.kind,
            "max_length": self.max_length,
            "truncation_side": self.truncation_side,
            "chat_template": self.has_chat_template,
            "device": str(self.device),
        }
