"""The trainable model: any HF sequence-classification checkpoint with a fresh K-way head.

The forward pools exactly as the engine does (last real token from the attention mask for decoders;
the model's own CLS/pooler head for right-padded encoders), so the logits trained are the rewards served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from model_store.loader import default_max_length, resolve_source
from model_store.manifest import BranchInfo, RewardManifest
from model_store.store import ModelStore, check_weights_safe
from scoring.branches import branch_rows, check_branch_pooling, run_branched
from scoring.heads import is_decoder, last_token_index, resolve_head

Mode = Literal["finetune", "frozen", "lora"]


def head_module(model: nn.Module) -> nn.Module:
    """The K-way head (decoders: `score`; BERT/DeBERTa: `classifier`; RoBERTa: `classifier` block)."""
    for attr in ("score", "classifier"):
        mod = getattr(model, attr, None)
        if isinstance(mod, nn.Module):
            return mod
    raise ValueError(
        f"{type(model).__name__} has no `score` or `classifier` head: not a sequence-classification model"
    )


def head_linear(model: nn.Module) -> nn.Linear:
    head = head_module(model)
    if isinstance(head, nn.Linear):
        return head
    out = getattr(head, "out_proj", None)
    if isinstance(out, nn.Linear):
        return out
    raise ValueError(f"cannot find the K-way linear layer of {type(model).__name__}")


class RewardForward(nn.Module):
    """Logits for a padded batch, pooled as the engine pools; one module so DDP/accelerate wrap it.
    With `branches` (per-head top layers), head j reads branch j's row through the engine's own
    branched pass (scoring/branches.py), so what is trained is what is served."""

    def __init__(self, hf: nn.Module, branches: nn.ModuleList | None = None) -> None:
        super().__init__()
        self.hf = hf
        self.decoder = is_decoder(hf)
        self.branches = branches
        if branches is not None:
            self.kind = resolve_head(hf, "auto").kind
            check_branch_pooling(self.kind)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.branches is not None:
            return self._branched(input_ids, attention_mask, token_type_ids)
        if self.decoder:
            pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            out = self.hf.base_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False
            )
            index = last_token_index(attention_mask)
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            return self.hf.score(out.last_hidden_state[rows, index])
        kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        return self.hf(**kw).logits

    def _branched(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.decoder:
            kw["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            kw["use_cache"] = False
        elif token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        assert self.branches is not None
        out, states = run_branched(self.hf, self.branches, lambda: self.hf.base_model(**kw))
        index = last_token_index(attention_mask) if self.decoder else attention_mask.argmax(-1)
        phi = branch_rows(self.hf, self.branches, self.kind, out, states, index)  # [B, K, H]
        drop = getattr(self.hf, "dropout", None)  # BERT's classifier dropout, as its own forward applies
        if isinstance(drop, nn.Dropout):
            phi = drop(phi)
        lin = head_linear(self.hf)
        logits = (phi * lin.weight[None]).sum(-1)
        return logits + lin.bias if lin.bias is not None else logits


@dataclass
class Loaded:
    model: nn.Module  # the HF model (LoRA layers injected in place when mode == "lora")
    peft_model: Any  # the PeftModel wrapper, or None
    tokenizer: Any
    manifest: RewardManifest  # serving facts inherited from the base (pooling, max_length, truncation)
    base_path: Path
    branches: nn.ModuleList | None = None  # heads 1..K-1's own top layers (branch_layers > 0)


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of the encoder's linear layers (LoRA targets), the head excluded."""
    head = head_module(model)
    head_ids = {id(m) for m in head.modules()}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in head_ids]


def load_base(
    base: str,
    num_heads: int,
    store: ModelStore,
    *,
    head_names: list[str],
    mode: Mode = "finetune",
    seed: int = 0,
    max_length: int | None = None,
    lora_r: int = 8,
    lora_alpha: int = 16,
    head_init_std: float | None = None,
    branch_layers: int = 0,
    feature_blocks: bool = False,
) -> Loaded:
    """Base checkpoint + a new K-way head (seeded), frozen/LoRA as asked; safetensors only. With
    `branch_layers`, heads 1..K-1 get their own copies of the last layers (branch 0 is the model)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path, _, _, _ = resolve_source(base, store)
    check_weights_safe(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=num_heads,
        id2label=dict(enumerate(head_names)),
        label2id={n: i for i, n in enumerate(head_names)},
        ignore_mismatched_sizes=True,
        use_safetensors=True,
        dtype=torch.float32,
    )
    if tokenizer.pad_token_id is None:  # GPT-2 style: pad with EOS; pooling reads the mask, not pad ids
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    lin = head_linear(model)
    gen = torch.Generator().manual_seed(seed)
    std = (
        head_init_std
        if head_init_std is not None
        else float(getattr(model.config, "initializer_range", 0.02))
    )
    with torch.no_grad():  # the heads' init depends on the seed alone, not on global RNG state
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * std)
        if lin.bias is not None:
            lin.bias.zero_()
    base_manifest = RewardManifest.read(path)
    limit = max_length or (
        base_manifest.max_length if base_manifest else default_max_length(model.config, tokenizer)
    )
    manifest = RewardManifest(
        num_heads=num_heads,
        head_names=head_names,
        pooling=base_manifest.pooling if base_manifest else "auto",
        max_length=limit,
        truncation_side=base_manifest.truncation_side if base_manifest else "left",
    )
    branches = None
    if branch_layers:
        from model_store.branches import copy_branches

        if mode != "finetune" or num_heads < 2 or feature_blocks:
            raise ValueError(
                "--branch-layers needs --mode finetune, at least 2 heads and no --feature-blocks"
            )
        branches = copy_branches(model, branch_layers, num_heads)
        manifest = manifest.model_copy(
            update={"branches": BranchInfo(layers=branch_layers), "format_version": 2}
        )
    peft_model = None
    if mode == "frozen":
        head_ids = {id(p) for p in head_module(model).parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head_ids)
    elif mode == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=linear_module_names(model))
        peft_model = get_peft_model(model, cfg)
        model = peft_model.get_base_model()
        for p in head_module(model).parameters():  # the new heads train in full
            p.requires_grad_(True)
    return Loaded(model, peft_model, tokenizer, manifest, path, branches)


def param_groups(model: nn.Module, lr_encoder: float, lr_heads: float) -> list[dict[str, Any]]:
    head_ids = {id(p) for p in head_module(model).parameters()}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) in head_ids]
    enc = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": heads, "lr": lr_heads}]
    if enc:
        groups.append({"params": enc, "lr": lr_encoder})
    return groups
