"""All K reward heads and their min/max/mean/std in one pass.

`multihead_reward` is the one public entry point. It dispatches to the Triton kernel for CUDA
tensors and to the torch reference otherwise; `HYDRA_RM_KERNEL=reference` forces the reference
(useful to bisect a numerical difference), `HYDRA_RM_KERNEL=triton` forces the kernel (on CPU that
only works under `TRITON_INTERPRET=1`, which is what the tests do).

`std` is the population standard deviation over heads (correction 0): it is a disagreement
measure, defined (as 0) for K=1, and UWO uses its square as the variance.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch


class HeadOutputs(NamedTuple):
    """Per-head rewards `[B, K]` and their reductions `[B]`, all float32."""

    rewards: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def _check_inputs(
    hidden: torch.Tensor, index: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor
) -> None:
    if index is None:
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be [B, H] when index is None, got shape {tuple(hidden.shape)}")
    else:
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [B, T, H] when index is given, got shape {tuple(hidden.shape)}")
        if index.dim() != 1 or index.shape[0] != hidden.shape[0]:
            raise ValueError(f"index must be [B={hidden.shape[0]}], got shape {tuple(index.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [K, H={hidden.shape[-1]}], got shape {tuple(weight.shape)}")
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must be [K={weight.shape[0]}], got shape {tuple(bias.shape)}")


def multihead_reward_reference(
    hidden: torch.Tensor,
    index: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> HeadOutputs:
    """Torch reference: gather, linear, reductions. `compute_dtype=float64` gives the test oracle."""
    _check_inputs(hidden, index, weight, bias)
    if index is not None:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pooled = hidden[rows, index.to(hidden.device, torch.long)]
    else:
        pooled = hidden
    rewards = pooled.to(compute_dtype) @ weight.to(compute_dtype).T + bias.to(compute_dtype)
    # torch.amin/amax propagate NaN, so a NaN head is never hidden by the pessimistic min.
    return HeadOutputs(
        rewards=rewards,
        min=rewards.amin(dim=1),
        max=rewards.amax(dim=1),
        mean=rewards.mean(dim=1),
        std=rewards.std(dim=1, correction=0),
    )


def _backend_for(hidden: torch.Tensor) -> str:
    choice = os.environ.get("HYDRA_RM_KERNEL", "auto").strip().lower()
    if choice not in {"auto", "reference", "triton"}:
        raise ValueError(f"HYDRA_RM_KERNEL must be auto, reference or triton, got {choice!r}")
    if choice == "auto":
        return "triton" if hidden.is_cuda and triton_available() else "reference"
    return choice


def triton_available() -> bool:
    """True when the Triton kernel can be imported (it is optional on CPU-only installs)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def multihead_reward(
    hidden: torch.Tensor, index: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor
) -> HeadOutputs:
    """Rewards of all K heads for each pooled row, plus min/max/mean/std over heads (fp32).

    `hidden` is `[B, T, H]` with `index [B]` the pooled position of each row, or an already pooled
    `[B, H]` with `index=None`. `weight [K, H]` and `bias [K]` have normalisation folded in.
    """
    if _backend_for(hidden) == "triton":
        from kernels.multihead_reward_triton import multihead_reward_triton

        return multihead_reward_triton(hidden, index, weight, bias)
    return multihead_reward_reference(hidden, index, weight, bias)
