"""The K heads over one encoder pass: head resolution, folded normalisation, pooling, device transfer
and the plain padded forward.

Shared by the engine (plain passes) and the prefix scorer (suffixes over cached prefixes), so both
pool, transfer and read results back the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from kernels import NoveltyTensors, ScoredRows, multihead_reward, multihead_reward_novelty
from model_store.errors import ModelStoreError
from model_store.manifest import HeadNormalization, RewardManifest
from model_store.tokenization import EncodedItem
from scoring.branches import block_diagonal, branch_rows, check_branch_pooling, run_branched
from scoring.results import ItemScore

log = logging.getLogger("hydra_rm.engine")

PoolKind = Literal["last_token", "first_token", "pooler", "cls_head"]


def is_decoder(model: nn.Module) -> bool:
    """A `score`-headed sequence classifier (Llama/Qwen/Mistral/Gemma/GPT-2 style): pooled at its last
    real token. The one test of "is this a decoder" for serving, prefix sharing and training."""
    return isinstance(getattr(model, "score", None), nn.Linear)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Each row's last real position, from the attention mask (never from pad ids), whichever side
    the padding is on: what a decoder's reward is pooled at, in serving and in training alike."""
    return (mask.shape[1] - 1) - mask.flip(-1).argmax(-1)


@dataclass(frozen=True)
class Head:
    kind: PoolKind
    linear: nn.Linear
    pre: nn.Module | None = None  # RoBERTa-style dense+tanh before the final projection


def resolve_head(model: nn.Module, pooling: str) -> Head:
    """Find the K-way linear layer and how its input is pooled, for the architectures we verify."""
    classifier = getattr(model, "classifier", None)
    if is_decoder(model):  # last real token
        if pooling == "pooler":
            raise ModelStoreError("manifest asks for pooling=pooler but this decoder has no pooler")
        kind: PoolKind = "last_token" if pooling in {"auto", "last_token"} else pooling  # type: ignore[assignment]
        return Head(kind, model.score)
    if isinstance(classifier, nn.Linear):
        base = model.base_model
        has_pooler = getattr(base, "pooler", None) is not None or getattr(model, "pooler", None) is not None
        if pooling in {"auto", "pooler"} and has_pooler:
            return Head("pooler", classifier)
        if pooling == "pooler":
            raise ModelStoreError("manifest asks for pooling=pooler but the model has no pooler")
        return Head("last_token" if pooling == "last_token" else "first_token", classifier)
    if classifier is not None and isinstance(getattr(classifier, "out_proj", None), nn.Linear):
        return Head("cls_head", classifier.out_proj, pre=classifier.dense)  # RoBERTa family
    raise ModelStoreError(
        f"unsupported architecture {type(model).__name__}: hydra-rm needs a sequence-classification model "
        "whose head is `score` (decoders), `classifier` (BERT/DeBERTa) or `classifier.out_proj` (RoBERTa)"
    )


def allow_tf32() -> None:
    """fp32 encoders on CUDA run their matmuls on TF32 tensor cores (10-bit mantissa products,
    fp32 accumulation: ~1e-3 relative on logits, the tolerance the engine's self-check allows fp16/
    bf16; an A100/H100 does ~8x the FLOP/s). Process-wide, so set only when a CUDA engine loads."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log.info("CUDA engine: TF32 matmuls allowed for fp32 weights")


def fold_normalization(
    weight: torch.Tensor, bias: torch.Tensor | None, normalization: HeadNormalization | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold per-head normalisation into head weights once, in fp32: (Wx + b - mu) / sigma.

    The one definition of per-head normalisation: the torch engine folds it into the model's head; the
    vLLM engine, which gets the K raw logits, folds it into an identity head."""
    w = weight.detach().to(torch.float32)
    b = bias.detach().to(torch.float32) if bias is not None else torch.zeros(w.shape[0], device=w.device)
    if normalization is not None:
        mean = torch.tensor(normalization.mean, dtype=torch.float32, device=w.device)
        std = torch.tensor(normalization.std, dtype=torch.float32, device=w.device)
        w = w / std[:, None]
        b = (b - mean) / std
    return w, b


def fold_heads(head: Head, manifest: RewardManifest) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's head with its normalisation folded in (`fold_normalization`)."""
    w, b = fold_normalization(head.linear.weight, head.linear.bias, manifest.normalization)
    # Half-precision encoders keep half-precision head weights (exact when nothing was folded):
    # with both kernel operands in bf16/fp16 the Triton kernel can use tensor cores.
    model_dtype = head.linear.weight.dtype
    if model_dtype in (torch.float16, torch.bfloat16):
        w = w.to(model_dtype)
    return w.contiguous(), b.contiguous()


def _to_host(res: Any) -> list[list[float]]:
    """All outputs in one device-to-host transfer: rows of [K rewards, min, max, mean, std(, u)].

    Five separate `.cpu()` calls were five synchronising copies per batch on CUDA."""
    heads, cols = (res.heads, [res.novelty]) if isinstance(res, ScoredRows) else (res, [])
    stats = torch.stack([heads.min, heads.max, heads.mean, heads.std, *cols], dim=1)
    return torch.cat([heads.rewards, stats], dim=1).cpu().tolist()


def item_scores(res: Any, batch: Sequence[EncodedItem]) -> list[ItemScore]:
    """One ItemScore per row of a kernel result (plain and shared-prefix forwards alike)."""
    if isinstance(res, ScoredRows):
        k = res.heads.rewards.shape[1]
        return [
            ItemScore(r[:k], r[k], r[k + 1], r[k + 2], r[k + 3], e.n_tokens, e.truncated, r[k + 4])
            for r, e in zip(_to_host(res), batch, strict=True)
        ]
    k = res.rewards.shape[1]
    return [
        ItemScore(r[:k], r[k], r[k + 1], r[k + 2], r[k + 3], e.n_tokens, e.truncated)
        for r, e in zip(_to_host(res), batch, strict=True)
    ]


class HeadForward:
    """A sequence classifier's encoder with its K heads folded for the fused kernel."""

    def __init__(
        self,
        model: nn.Module,
        manifest: RewardManifest,
        *,
        pad_id: int,
        padding_side: Literal["right", "left"],
        novelty: NoveltyTensors | None = None,
        branches: nn.ModuleList | None = None,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.head = resolve_head(model, manifest.pooling)
        self.is_decoder = self.head.kind == "last_token"
        # Encoders pool at position 0 (CLS) and use absolute positions: they must be right-padded.
        self.padding_side = padding_side if self.is_decoder else "right"
        self.pad_id = pad_id
        self.weight, self.bias = fold_heads(self.head, manifest)
        # Per-head branches (scoring/branches.py): the kernel reads the K branches' rows side by side
        # through a block-diagonal head, so everything after pooling is the unbranched path.
        self.branches = branches
        if branches is not None:
            check_branch_pooling(self.head.kind)
            self.weight = block_diagonal(self.weight).contiguous()
        # The feature-space novelty statistic on this device (None: the heads-only kernel call).
        self.novelty = novelty

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host-to-device from pinned memory, asynchronous on CUDA; pinning is skipped on CPU (where
        there is no copy, and a CPU-only torch cannot pin)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def pool(self, out: Any, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kernel's input: hidden states and the pooled row per item (None: already pooled)."""
        kind = self.head.kind
        if isinstance(out, _Branched):
            index = last_token_index(mask) if kind == "last_token" else mask.argmax(-1)
            rows = branch_rows(self.model, self.branches, kind, out.out, out.states, index)  # type: ignore[arg-type]
            return rows.flatten(1), None
        if kind == "pooler":
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:  # DeBERTa keeps its pooler on the task model, not the base model
                pooled = self.model.pooler(out.last_hidden_state)
            return pooled, None
        hidden = out.last_hidden_state
        if kind == "last_token":
            index = last_token_index(mask)
        else:
            index = mask.argmax(-1)
        if kind == "cls_head":
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return torch.tanh(self.head.pre(hidden[rows, index])), None
        return hidden, index

    def scores(self, out: Any, mask: torch.Tensor, batch: Sequence[EncodedItem]) -> list[ItemScore]:
        """Pool an encoder output, run all K heads in the fused kernel, one transfer back to the host."""
        hidden, index = self.pool(out, mask)
        if self.novelty is None:
            return item_scores(multihead_reward(hidden, index, self.weight, self.bias), batch)
        return item_scores(
            multihead_reward_novelty(hidden, index, self.weight, self.bias, self.novelty), batch
        )

    def forward_padded(self, batch: Sequence[EncodedItem]) -> list[ItemScore]:
        """One encoder pass over `batch` (padded to its longest row); results in batch order."""
        if not batch:
            return []
        with torch.inference_mode():
            out, mask = self._encode(batch)
            return self.scores(out, mask, batch)

    def features(self, batch: Sequence[EncodedItem]) -> torch.Tensor:
        """phi [B, H] float32 on the CPU: the rows the heads' final linear layer reads (what the
        novelty statistic is fitted on), from one padded pass."""
        with torch.inference_mode():
            out, mask = self._encode(batch)
            hidden, index = self.pool(out, mask)
            if index is not None:
                hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
            return hidden.float().cpu()

    def _encode(self, batch: Sequence[EncodedItem]) -> tuple[Any, torch.Tensor]:
        """Pad and run the encoder once (call under inference_mode): its output and the mask."""
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
        ids, mask = self.to_device(ids), self.to_device(mask)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            kwargs["token_type_ids"] = self.to_device(types)
        if self.is_decoder:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            kwargs["use_cache"] = False
        if self.branches is not None:
            out, states = run_branched(self.model, self.branches, lambda: self.model.base_model(**kwargs))
            return _Branched(out, states), mask
        return self.model.base_model(**kwargs), mask


@dataclass(frozen=True)
class _Branched:
    """A branched pass: the model's own output (branch 0) and branches 1..K-1's last hidden states."""

    out: Any
    states: list[torch.Tensor]
