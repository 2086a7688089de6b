"""Fine-tune the top layers of a pretrained BERT on cached lower-layer states: the pretrained experiment's
fast path.

Why: on this shared 2-core machine a full MiniLM fine-tune of 1,200 pairs x 2 epochs took ~5 min, and
the experiment needs dozens of runs. The embeddings and the lower `frozen_layers` encoder layers are run
once per text (no grad) and cached; each run trains only the top layers + pooler + K heads on those
states (~3x less compute per step, and pool scoring shares the cached states across every model). The
loss, diversity weights and head masks are the trainer's own (`training.loss`, `training.diversity`);
`to_hf` writes the trained top back into a Hugging Face model that `hydra-rm serve` loads as is.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from training.diversity import decorrelation_penalty, feature_block_mask, head_weights
from training.loss import multihead_bt_loss


@dataclass
class Cached:
    """Lower-layer states of a list of texts: hidden[i] is [len_i, H] (fp32, no padding)."""

    hidden: list[torch.Tensor]


class Trunk:
    """A pretrained BERT sequence-classification model split at `frozen_layers`."""

    def __init__(self, hf: Any, tokenizer: Any, frozen_layers: int) -> None:
        self.hf = hf.eval()
        self.tokenizer = tokenizer
        self.frozen_layers = frozen_layers
        self.bert = hf.bert

    def ext_mask(self, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
        return self.bert._create_attention_masks(
            attention_mask=mask, encoder_attention_mask=None, embedding_output=hidden,
            encoder_hidden_states=None, cache=None,
        )[0]  # fmt: skip

    @torch.no_grad()
    def cache(self, texts: list[str], batch_size: int = 128) -> Cached:
        enc = [self.tokenizer(t, truncation=True, max_length=128)["input_ids"] for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
        out: list[torch.Tensor | None] = [None] * len(texts)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            t = max(len(enc[i]) for i in idx)
            ids = torch.zeros(len(idx), t, dtype=torch.long)
            mask = torch.zeros(len(idx), t, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(enc[i])] = torch.tensor(enc[i])
                mask[r, : len(enc[i])] = 1
            h = self.bert.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
            m = self.ext_mask(h, mask)
            for layer in self.bert.encoder.layer[: self.frozen_layers]:
                h = layer(h, m)
            for r, i in enumerate(idx):
                out[i] = h[r, : len(enc[i])].clone()
        return Cached(out)  # type: ignore[arg-type]


class Top(nn.Module):
    """Upper encoder layers + pooler + K linear heads; returns (rewards [B, K], pooled features [B, H])."""

    def __init__(self, trunk: Trunk, heads: int, init_std: float, seed: int) -> None:
        super().__init__()
        self.trunk = [trunk]  # not a submodule: never trained, never copied
        self.layers = copy.deepcopy(trunk.bert.encoder.layer[trunk.frozen_layers :])
        self.pooler = copy.deepcopy(trunk.bert.pooler)
        self.dropout = nn.Dropout(trunk.hf.config.hidden_dropout_prob)
        h = trunk.hf.config.hidden_size
        self.classifier = nn.Linear(h, heads)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # as training.model.load_base draws a head: seed alone decides it
            self.classifier.weight.copy_(torch.randn(heads, h, generator=gen) * init_std)
            self.classifier.bias.zero_()

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.trunk[0].ext_mask(hidden, mask)
        for layer in self.layers:
            hidden = layer(hidden, m)
        phi = self.pooler(hidden)
        return self.classifier(self.dropout(phi)), phi


def pad(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(s.shape[0] for s in states)
    h = torch.zeros(len(states), t, states[0].shape[1])
    mask = torch.zeros(len(states), t, dtype=torch.long)
    for i, s in enumerate(states):
        h[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    return h, mask


@dataclass
class Recipe:
    """How K heads are made to differ (see training.diversity); members > 1 = a full ensemble."""

    name: str
    heads: int = 3
    diversity: str = "joint"
    feature_blocks: bool = False
    decorrelation: float = 0.0
    head_init_std: float = 0.02
    members: int = 1  # > 1: that many separately trained single-head models (heads must be 1)
    frozen: bool = False  # train the heads only (the trunk's top stays pretrained)


@dataclass
class TrainHP:
    """Fixed in the screen from held-out accuracy only (1,080 clean pairs, 2 epochs, seed 1: joint heads
    0.797 at lr_top 5e-5 / 0.83 at 2e-4), never from a pool's gold."""

    epochs: int = 2
    batch_size: int = 16
    lr_top: float = 2e-4
    lr_heads: float = 2e-3


def train_top(
    trunk: Trunk, cached: Cached, pairs: list[tuple[int, int]], recipe: Recipe, hp: TrainHP, seed: int
) -> tuple[Top, float]:
    """One model (K heads) on (chosen, rejected) indices into `cached`; returns (model, seconds)."""
    t0 = time.perf_counter()
    k = recipe.heads
    top = Top(trunk, k, recipe.head_init_std, seed)
    mask = None
    if recipe.feature_blocks and k > 1:
        mask = feature_block_mask(k, top.classifier.in_features, seed)
        with torch.no_grad():
            top.classifier.weight.mul_(mask)
        top.classifier.weight.register_hook(lambda g: g * mask)
    w = head_weights(recipe.diversity, len(pairs), k, seed)
    wmean = w.mean(0)
    groups = [{"params": list(top.classifier.parameters()), "lr": hp.lr_heads}]
    if not recipe.frozen:
        groups.append(
            {"params": list(top.layers.parameters()) + list(top.pooler.parameters()), "lr": hp.lr_top}
        )
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    top.train()
    n = len(pairs)
    for epoch in range(hp.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        for b, s in enumerate(range(0, n, hp.batch_size)):
            torch.manual_seed(seed * 1_000_003 + epoch * 100_003 + b)
            idx = order[s : s + hp.batch_size]
            states = [cached.hidden[pairs[i][0]] for i in idx] + [cached.hidden[pairs[i][1]] for i in idx]
            h, m = pad(states)
            r, _ = top(h, m)
            c, rj = r[: len(idx)], r[len(idx) :]
            loss = multihead_bt_loss(c, rj, w[idx], wmean)
            if recipe.decorrelation and k > 1:
                loss = loss + recipe.decorrelation * decorrelation_penalty(r)
            opt.zero_grad()
            loss.backward()
            opt.step()
    top.eval()
    return top, time.perf_counter() - t0


@torch.no_grad()
def score_top(top: Top, cached: Cached, idx: list[int] | None = None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Raw rewards [N, K] and pooled features [N, H] of cached texts (length-sorted batches)."""
    idx = list(range(len(cached.hidden))) if idx is None else idx
    order = sorted(range(len(idx)), key=lambda j: cached.hidden[idx[j]].shape[0])
    rew = torch.empty(len(idx), top.classifier.out_features)
    phi = torch.empty(len(idx), top.classifier.in_features)
    for s in range(0, len(order), batch_size):
        js = order[s : s + batch_size]
        h, m = pad([cached.hidden[idx[j]] for j in js])
        r, f = top(h, m)
        rew[js], phi[js] = r, f
    return rew, phi


def to_hf(top: Top, names: list[str]) -> Any:
    """A full HF model (lower layers as pretrained, top as trained) with K heads: what serve loads."""
    trunk = top.trunk[0]
    hf = copy.deepcopy(trunk.hf)
    k = top.classifier.out_features
    hf.classifier = copy.deepcopy(top.classifier)
    hf.num_labels = k
    hf.config.num_labels = k
    hf.config.id2label = dict(enumerate(names))
    hf.config.label2id = {n: i for i, n in enumerate(names)}
    for i, layer in enumerate(top.layers):
        hf.bert.encoder.layer[trunk.frozen_layers + i] = copy.deepcopy(layer)
    hf.bert.pooler = copy.deepcopy(top.pooler)
    return hf.eval()
