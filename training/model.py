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
from model_store.manifest import RewardManifest
from model_store.store import ModelStore, check_weights_safe
from scoring.heads import is_decoder, last_token_index

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
    """Logits for a padded batch, pooled as the engine pools; one module so DDP/accelerate wrap it."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        self.decoder = is_decoder(hf)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
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


@dataclass
class Loaded:
    model: nn.Module  # the HF model (LoRA layers injected in place when mode == "lora")
    peft_model: Any  # the PeftModel wrapper, or None
    tokenizer: Any
    manifest: RewardManifest  # serving facts inherited from the base (pooling, max_length, truncation)
    base_path: Path


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
) -> Loaded:
    """Base checkpoint + a new K-way head (seeded), frozen/LoRA as asked; safetensors only."""
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
    return Loaded(model, peft_model, tokenizer, manifest, path)


def param_groups(model: nn.Module, lr_encoder: float, lr_heads: float) -> list[dict[str, Any]]:
    head_ids = {id(p) for p in head_module(model).parameters()}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) in head_ids]
    enc = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": heads, "lr": lr_heads}]
    if enc:
        groups.append({"params": enc, "lr": lr_encoder})
    return groups
