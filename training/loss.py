"""Multi-head Bradley-Terry loss: the mean over heads of each head's (weighted) BT loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multihead_bt_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, weights: torch.Tensor | None = None,
    weight_means: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """chosen/rejected: [B, K] rewards. Head k's loss is sum_i w_ik * -log sigmoid(c_ik - r_ik), divided
    by B * mean_k(w) (its expected weight over the whole data set, not this batch's, so a shard head
    that drew no pair in a batch adds nothing and the per-epoch objective is each head's weighted mean).
    With weights of 1 this is the plain mean BT loss over pairs and heads."""
    per = -F.logsigmoid(chosen - rejected)
    if weights is None:
        return per.mean()
    denom = per.shape[0] * (weight_means if weight_means is not None else weights.mean(0)).clamp(min=1e-12)
    return ((weights * per).sum(0) / denom).mean()
