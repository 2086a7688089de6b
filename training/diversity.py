"""Per-example, per-head loss weights: how K heads on one trunk are made to differ.

All recipes keep the serving format (one encoder + K linear heads); only which pairs each head's
Bradley-Terry loss sees changes. Weights depend on (seed, example index) alone, so a resumed run
sees exactly the weights of an uninterrupted one.

- joint: every head sees every pair (the paper's recipe; heads differ only by init).
- bootstrap: Poisson(1) weight per pair per head (online bagging).
- shard: each pair goes to exactly one head (a seeded random partition); the trunk still learns from
  all pairs. In the design toy this recovered ~115% of a full ensemble's gain (DESIGN.md).
"""

from __future__ import annotations

import torch

DIVERSITY = ("joint", "bootstrap", "shard")


def head_weights(kind: str, n: int, k: int, seed: int) -> torch.Tensor:
    """[n, k] float weights; column means are what the loss normalises by."""
    gen = torch.Generator().manual_seed(10_007 * seed + 17)
    if kind == "joint":
        return torch.ones(n, k)
    if kind == "bootstrap":
        return torch.poisson(torch.ones(n, k), generator=gen)
    if kind == "shard":
        w = torch.zeros(n, k)
        perm = torch.randperm(n, generator=gen)
        w[perm, torch.arange(n) % k] = 1.0
        return w
    raise ValueError(f"unknown diversity {kind!r}; expected one of {', '.join(DIVERSITY)}")


def feature_block_mask(k: int, hidden: int, seed: int) -> torch.Tensor:
    """[k, hidden] 0/1: a seeded partition of the pooled features into k disjoint blocks, one per head.

    With the pooler's dense+tanh in front, head k then owns its slice of that layer: a private one-
    hidden-layer MLP on the shared trunk, still stored as one K-way linear head (zeros outside its block).
    """
    perm = torch.randperm(hidden, generator=torch.Generator().manual_seed(10_007 * seed + 29))
    mask = torch.zeros(k, hidden)
    mask[torch.arange(hidden) % k, perm] = 1.0
    return mask


def decorrelation_penalty(rewards: torch.Tensor) -> torch.Tensor:
    """Mean off-diagonal Pearson correlation of the heads' rewards over a batch ([B, K], K > 1)."""
    z = rewards - rewards.mean(0, keepdim=True)
    z = z / (z.pow(2).mean(0, keepdim=True).sqrt() + 1e-6)
    c = z.T @ z / z.shape[0]
    k = c.shape[0]
    return (c.sum() - c.diagonal().sum()) / (k * (k - 1))
