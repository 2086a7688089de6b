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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from training.diversity import decorrelation_penalty, feature_block_mask, head_weights
from training.loss import multihead_bt_loss


@dataclass
class Cached:
    """Lower-layer states of a list of texts: hidden[i] is [len_i, H] (fp32, no padding), on the trunk's
    device. `batch` gathers rows from one padded copy built on first use (no per-item loop per step)."""

    hidden: list[torch.Tensor]
    _padded: tuple[int, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [N, T, H] zero-padded, lengths [N] on the CPU); rebuilt when `hidden` grew."""
        if self._padded is None or self._padded[0] != len(self.hidden):
            lengths = torch.tensor([h.shape[0] for h in self.hidden])
            states = torch.nn.utils.rnn.pad_sequence(self.hidden, batch_first=True)
            self._padded = (len(self.hidden), states, lengths)
        return self._padded[1], self._padded[2]

    def batch(self, idx: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded states [B, t, H] and mask [B, t] of rows `idx`, t = their longest: what `pad` gives."""
        states, lengths = self.padded()
        idx = torch.as_tensor(idx, dtype=torch.long)
        ln = lengths[idx]
        t = int(ln.max())
        h = states[idx.to(states.device), :t]
        mask = (torch.arange(t)[None, :] < ln[:, None]).long().to(states.device)
        return h, mask


class Trunk:
    """A pretrained BERT sequence-classification model split at `frozen_layers`."""

    def __init__(
        self, hf: Any, tokenizer: Any, frozen_layers: int, device: str | torch.device = "cpu"
    ) -> None:
        self.device = torch.device(device)
        self.hf = hf.eval().to(self.device)
        self.tokenizer = tokenizer
        self.frozen_layers = frozen_layers
        self.bert = hf.bert

    def ext_mask(self, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
        # Positional: the last parameter is `cache` in transformers 5.24, `past_key_values` in 5.17.
        return self.bert._create_attention_masks(mask, None, hidden, None, None)[0]

    @torch.no_grad()
    def cache(self, texts: list[str], batch_size: int | None = None) -> Cached:
        batch_size = batch_size or (128 if self.device.type == "cpu" else 1024)
        enc = self.tokenizer(texts, truncation=True, max_length=128)["input_ids"] if texts else []
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
            ids, mask = ids.to(self.device), mask.to(self.device)
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
        self.classifier = _heads(trunk, heads, init_std, seed)

    @property
    def feat_dim(self) -> int:
        return self.classifier.in_features

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.trunk[0].ext_mask(hidden, mask)
        for layer in self.layers:
            hidden = layer(hidden, m)
        phi = self.pooler(hidden)
        return self.classifier(self.dropout(phi)), phi


def _heads(trunk: Trunk, heads: int, init_std: float, seed: int) -> nn.Linear:
    h = trunk.hf.config.hidden_size
    lin = nn.Linear(h, heads)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # as training.model.load_base draws a head: seed alone decides it
        lin.weight.copy_(torch.randn(heads, h, generator=gen) * init_std)
        lin.bias.zero_()
    return lin.to(trunk.device)


class BranchTop(nn.Module):
    """Hydra-style branches: shared upper layers, then per head its own copy of the last `own` layers +
    pooler; head j reads only branch j's pooled features (row j of `classifier`). Returns (rewards
    [B, K], the branches' pooled features concatenated [B, K*H]). Measured only: serving it needs a
    model format with branches, which does not exist."""

    def __init__(self, trunk: Trunk, heads: int, init_std: float, seed: int, own: int) -> None:
        super().__init__()
        top_layers = trunk.bert.encoder.layer[trunk.frozen_layers :]
        if not 1 <= own <= len(top_layers):
            raise ValueError(f"branch layers {own}: the trained top has {len(top_layers)} layers")
        self.trunk = [trunk]
        self.layers = copy.deepcopy(top_layers[: len(top_layers) - own])
        self.branches = nn.ModuleList(
            nn.ModuleDict(
                {"layers": copy.deepcopy(top_layers[len(top_layers) - own :]), "pooler": copy.deepcopy(trunk.bert.pooler)}
            )
            for _ in range(heads)
        )  # fmt: skip
        self.dropout = nn.Dropout(trunk.hf.config.hidden_dropout_prob)
        self.classifier = _heads(trunk, heads, init_std, seed)

    @property
    def feat_dim(self) -> int:
        return self.classifier.in_features * self.classifier.out_features

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.trunk[0].ext_mask(hidden, mask)
        for layer in self.layers:
            hidden = layer(hidden, m)
        phis = []
        for br in self.branches:
            h = hidden
            for layer in br["layers"]:
                h = layer(h, m)
            phis.append(br["pooler"](h))
        phi = torch.stack(phis, dim=1)  # [B, K, H]
        r = (self.dropout(phi) * self.classifier.weight[None]).sum(-1) + self.classifier.bias
        return r, phi.flatten(1)


def pad(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(s.shape[0] for s in states)
    h = torch.zeros(len(states), t, states[0].shape[1], device=states[0].device)
    mask = torch.zeros(len(states), t, dtype=torch.long, device=states[0].device)
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
    branch_layers: int = 0  # > 0: each head owns a copy of the last this many layers + pooler (BranchTop)


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
) -> tuple[Top | BranchTop, float]:
    """One model (K heads) on (chosen, rejected) indices into `cached`; returns (model, seconds)."""
    sync = torch.cuda.synchronize if trunk.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    k = recipe.heads
    top: Top | BranchTop
    if recipe.branch_layers:
        top = BranchTop(trunk, k, recipe.head_init_std, seed, recipe.branch_layers)
    else:
        top = Top(trunk, k, recipe.head_init_std, seed)
    mask = None
    if recipe.feature_blocks and k > 1 and not recipe.branch_layers:
        mask = feature_block_mask(k, top.classifier.in_features, seed).to(trunk.device)
        with torch.no_grad():
            top.classifier.weight.mul_(mask)
        top.classifier.weight.register_hook(lambda g: g * mask)
    w = head_weights(recipe.diversity, len(pairs), k, seed).to(trunk.device)
    wmean = w.mean(0)
    groups = [{"params": list(top.classifier.parameters()), "lr": hp.lr_heads}]
    if not recipe.frozen:
        body = [p for n, p in top.named_parameters() if not n.startswith("classifier.")]
        groups.append({"params": body, "lr": hp.lr_top})
    fused = {"fused": True} if trunk.device.type == "cuda" else {}  # one kernel per step; CPU path unchanged
    opt = torch.optim.AdamW(groups, weight_decay=0.0, **fused)
    top.train()
    n = len(pairs)
    chosen = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    rejected = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    for epoch in range(hp.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for b, s in enumerate(range(0, n, hp.batch_size)):
            torch.manual_seed(seed * 1_000_003 + epoch * 100_003 + b)
            idx = order[s : s + hp.batch_size]
            h, m = cached.batch(torch.cat([chosen[idx], rejected[idx]]))
            r, _ = top(h, m)
            c, rj = r[: len(idx)], r[len(idx) :]
            loss = multihead_bt_loss(c, rj, w[idx.to(w.device)], wmean)
            if recipe.decorrelation and k > 1:
                loss = loss + recipe.decorrelation * decorrelation_penalty(r)
            opt.zero_grad()
            loss.backward()
            opt.step()
    top.eval()
    sync()
    return top, time.perf_counter() - t0


@torch.no_grad()
def score_top(top: Top | BranchTop, cached: Cached, idx: list[int] | None = None, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Raw rewards [N, K] and pooled features [N, feat_dim] of cached texts (length-sorted batches), on
    the CPU."""
    idx = list(range(len(cached.hidden))) if idx is None else idx
    device = top.classifier.weight.device
    batch_size = batch_size or (256 if device.type == "cpu" else 2048)
    _, lengths = cached.padded()
    sel = torch.as_tensor(idx, dtype=torch.long)
    order = lengths[sel].argsort(stable=True)
    rew = torch.empty(len(idx), top.classifier.out_features)
    phi = torch.empty(len(idx), top.feat_dim)
    for s in range(0, len(order), batch_size):
        js = order[s : s + batch_size]
        r, f = top(*cached.batch(sel[js]))
        rew[js], phi[js] = r.cpu(), f.cpu()
    return rew, phi


def to_hf(top: Top, names: list[str]) -> Any:
    """A full HF model (lower layers as pretrained, top as trained) with K heads: what serve loads."""
    if isinstance(top, BranchTop):
        raise TypeError("a branched top has no single-trunk HF form; see branch_to_hf")
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


def branch_to_hf(top: BranchTop, j: int) -> Any:
    """Head j of a branched top as a plain one-head HF model (pretrained lower layers, the shared trained
    layers, branch j's own layers and pooler, row j of the heads): the reference its output must equal."""
    trunk = top.trunk[0]
    hf = copy.deepcopy(trunk.hf)
    hf.classifier = nn.Linear(top.classifier.in_features, 1).to(trunk.device)
    with torch.no_grad():
        hf.classifier.weight.copy_(top.classifier.weight[j : j + 1])
        hf.classifier.bias.copy_(top.classifier.bias[j : j + 1])
    hf.num_labels = hf.config.num_labels = 1
    own = [*top.layers, *top.branches[j]["layers"]]
    for i, layer in enumerate(own):
        hf.bert.encoder.layer[trunk.frozen_layers + i] = copy.deepcopy(layer)
    hf.bert.pooler = copy.deepcopy(top.branches[j]["pooler"])
    return hf.eval()
