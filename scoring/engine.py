"""Scoring engine: tokenize -> one encoder pass per batch -> all K heads via the fused kernel.

Invariants the tests hold us to:
- a reward equals the Hugging Face model's own logits for that head (1e-5, fp32);
- a reward does not depend on its batch: padding, batch size and neighbours change nothing beyond
  float rounding. So the pooled position comes from the attention mask (never from pad ids), and
  decoders get explicit position ids so left padding does not shift RoPE positions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch

from kernels import NoveltyTensors
from model_store.errors import ModelStoreError
from model_store.loader import RewardModel
from model_store.tokenization import EncodedItem, Item, ItemError, ItemTokenizer
from scoring.base import PlannedEngine
from scoring.batching import BatchPolicy
from scoring.cpu_gemm import pack_linears
from scoring.heads import HeadForward, allow_tf32, resolve_head
from scoring.prefix import PrefixScorer
from scoring.results import ItemScore

log = logging.getLogger("hydra_rm.engine")

__all__ = ["EncodedItem", "Item", "ItemError", "ItemScore", "ScoringEngine"]


class ScoringEngine(PlannedEngine):
    """Scores items with one shared encoder and K heads; thread-compatible (one forward at a time)."""

    def __init__(
        self,
        rm: RewardModel,
        *,
        policy: BatchPolicy | None = None,
        padding_side: Literal["right", "left"] = "right",
        max_length: int | None = None,
        truncation_side: str | None = None,
        cpu_packed_linear: bool = False,
    ) -> None:
        self.rm = rm
        self.model = rm.model
        self.tokenizer = rm.tokenizer
        self.manifest = rm.manifest
        self.device = next(self.model.parameters()).device
        if self.device.type == "cuda":
            allow_tf32()
        # Opt-in oneDNN-prepacked encoder linears on CPU (scoring/cpu_gemm.py); the heads stay as they are.
        self.packed_linears = 0
        if cpu_packed_linear and self.device.type == "cpu":
            self.packed_linears = pack_linears(self.model.base_model)
            if rm.branches is not None:
                self.packed_linears += pack_linears(rm.branches)
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
        pad_id = self.items.pad_id
        # Pooling, folded heads, device transfer and the plain padded pass (scoring/heads.py).
        self.heads = HeadForward(
            self.model,
            self.manifest,
            pad_id=pad_id,
            padding_side=padding_side,
            novelty=self._novelty_tensors(),
            branches=rm.branches,
        )
        self.head = self.heads.head
        self.is_decoder = self.heads.is_decoder
        self.padding_side = self.heads.padding_side
        self.has_chat_template = self.items.has_chat_template
        if self.head.kind == resolve_head(self.model, "auto").kind:  # an explicit override has no HF twin
            self._self_check()
        # Shared prompts encoded once, duplicates scored once (scoring/prefix.py); the batch plan only
        # keeps prefix groups together where this model can really share.
        self.prefix = PrefixScorer(self, enabled=self.policy.prefix_sharing)
        if self.policy.prefix_sharing and not self.prefix.sharing:
            self.policy = replace(self.policy, prefix_sharing=False)

    # -- model facts -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.rm.name

    @property
    def version(self) -> str:
        return self.rm.version

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
        if self.heads.branches is not None:  # the HF forward is branch 0: only head 0 has a twin there
            ours, ref = ours[:1], ref[:1]
        tol = 1e-3 if self.head.linear.weight.dtype == torch.float32 else 5e-2
        if not torch.allclose(ours, ref, atol=tol, rtol=tol):
            raise ModelStoreError(
                f"{type(self.model).__name__} is not supported: hydra-rm's pooling + heads do not reproduce "
                f"the model's own logits (max difference {(ours - ref).abs().max().item():.3g})"
            )

    # -- scoring ---------------------------------------------------------------------------------
    def forward(self, batch: Sequence[EncodedItem]) -> list[ItemScore]:
        """Score one planned batch, results in batch order: shared prefixes and duplicates computed
        once (scoring/prefix.py) unless HYDRA_RM_PREFIX_SHARING=off; equal to `forward_padded`."""
        if self.prefix.enabled:
            return self.prefix.forward(batch)
        return self.forward_padded(batch)

    def forward_padded(self, batch: Sequence[EncodedItem]) -> list[ItemScore]:
        """One encoder pass over `batch` (padded to its longest row); results in batch order."""
        return self.heads.forward_padded(batch)

    @property
    def novelty(self) -> NoveltyTensors | None:
        """The feature-space novelty statistic being served (None: u is absent from every output)."""
        return self.heads.novelty

    def _novelty_tensors(self) -> NoveltyTensors | None:
        """The model's statistic on the engine's device, if it was fitted on the row the heads read."""
        stat, info = self.rm.novelty, self.manifest.novelty
        if stat is None or info is None:
            return None
        kind = resolve_head(self.model, self.manifest.pooling).kind
        if info.feature != kind:  # u on another row than the one it was fitted on means nothing
            raise ModelStoreError(
                f"the novelty statistic was fitted on {info.feature} features but this engine pools "
                f"{kind}; re-run `hydra-rm calibrate` with this pooling"
            )
        return NoveltyTensors(stat.basis.to(self.device), stat.coef.to(self.device), stat.resid)

    def pooled_features(self, encoded: Sequence[EncodedItem]) -> torch.Tensor:
        """phi [N, H] float32 on the CPU, in input order, batched by the engine's policy: the rows the
        heads' final linear layer reads. What `hydra-rm calibrate` fits the novelty statistic on."""
        out: list[torch.Tensor | None] = [None] * len(encoded)
        for idxs in self.policy.plan_items(encoded):
            rows = self.heads.features([encoded[i] for i in idxs])
            for j, i in enumerate(idxs):
                out[i] = rows[j]
        return torch.stack(out) if out else torch.empty(0, self.heads.weight.shape[1])  # type: ignore[arg-type]

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
            **(
                {"branch_layers": self.manifest.branches.layers} if self.manifest.branches is not None else {}
            ),
        }

    def fingerprint(self) -> dict[str, Any]:
        """The weights and the settings that change rewards (scoring/interface.py)."""
        rm = self.rm
        files: Any = rm.manifest.files or sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(rm.path).iterdir() if p.is_file()
        )
        return {
            "name": rm.name,
            "version": rm.version,
            "files": files,
            "max_length": self.max_length,
            "truncation_side": self.truncation_side,
            "normalization": rm.manifest.normalization.model_dump() if rm.manifest.normalization else None,
            "dtype": str(self.heads.weight.dtype),
            # Rows carry std_percentile: other quantiles, other rows.
            "disagreement": rm.manifest.disagreement.model_dump() if rm.manifest.disagreement else None,
            # Rows carry novelty (its file is in `files`) and its percentile; absent for models without,
            # so their fingerprint (and a resumable job) is what it was.
            **({"novelty": rm.manifest.novelty.model_dump()} if rm.manifest.novelty is not None else {}),
        }
