"""The branched forward (model_store/branches.py says what a branch is): one pass for serving and training.

The checkpoint's own forward is branch 0. A pre-hook on the first branched layer records what the model
hands that layer (the hidden state, and the mask / position arguments it built), and each other branch
runs its own copies of the last layers from there. So the shared layers run once, the mask and positions
are the model's own (no private API), and head j reads branch j's pooled row.

The heads then see the K pooled rows side by side, phi = [phi_0 | ... | phi_{K-1}] of width K*H, and a
block-diagonal [K, K*H] weight (row j non-zero on block j only): the fused kernel, the folded
normalisation and the novelty statistic take that row unchanged. The K-fold wider head costs K*K*H
multiply-adds per item, nothing beside the encoder's ~12*H*H per token per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from model_store.branches import layer_stack
from model_store.errors import ModelStoreError

BRANCH_POOLING = ("pooler", "first_token", "last_token")


def check_branch_pooling(kind: str) -> None:
    if kind not in BRANCH_POOLING:
        raise ModelStoreError(f"branches pool with {', '.join(BRANCH_POOLING)}; this model pools with {kind}")


def run_branched(model: nn.Module, branches: nn.ModuleList, run: Callable[[], Any]) -> tuple[Any, list[torch.Tensor]]:  # fmt: skip
    """`run()` (the model's own forward: branch 0) and the last hidden states of branches 1..K-1."""
    layers = layer_stack(model)
    first = layers[len(layers) - len(branches[0].layers)]
    seen: dict[str, Any] = {}

    def grab(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["args"], seen["kwargs"] = args, kwargs

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = run()
    finally:
        handle.remove()
    args, kwargs = seen["args"], dict(seen["kwargs"])
    if args:
        h0, rest = args[0], args[1:]
    else:
        h0, rest = kwargs.pop("hidden_states"), ()
    states = []
    for br in branches:
        h = h0
        for layer in br.layers:
            o = layer(h, *rest, **kwargs)
            h = o[0] if isinstance(o, tuple) else o
        states.append(h)
    return out, states


def branch_rows(
    model: nn.Module, branches: nn.ModuleList, kind: str, out: Any, states: list[torch.Tensor], index: torch.Tensor
) -> torch.Tensor:  # fmt: skip
    """[B, K, H]: each branch's pooled row (the row its head reads), branch 0 from the model's output."""
    rows = torch.arange(index.shape[0], device=index.device)
    if kind == "pooler":
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:  # DeBERTa keeps its pooler on the task model
            pooled = model.pooler(out.last_hidden_state)
        phis = [pooled] + [br.tail(h) for br, h in zip(branches, states, strict=True)]
    elif kind == "last_token":  # the final norm is per position: gather first, then normalise
        phis = [out.last_hidden_state[rows, index]]
        phis += [br.tail(h[rows, index]) if br.tail is not None else h[rows, index]
                 for br, h in zip(branches, states, strict=True)]  # fmt: skip
    else:  # first_token: the last layer's output as is
        phis = [out.last_hidden_state[rows, index]] + [h[rows, index] for h in states]
    return torch.stack(phis, dim=1)


def block_diagonal(weight: torch.Tensor) -> torch.Tensor:
    """[K, H] -> [K, K*H], row j's weights on block j: head j reads only branch j's row of phi."""
    k, h = weight.shape
    out = torch.zeros(k, k * h, dtype=weight.dtype, device=weight.device)
    for j in range(k):
        out[j, j * h : (j + 1) * h] = weight[j]
    return out
