"""Fused multi-head reward kernels (Triton on CUDA, a torch reference everywhere else)."""

from kernels.multihead_reward import (
    HeadOutputs,
    NoveltyTensors,
    ScoredRows,
    multihead_reward,
    multihead_reward_novelty,
    multihead_reward_reference,
)

__all__ = [
    "HeadOutputs",
    "NoveltyTensors",
    "ScoredRows",
    "multihead_reward",
    "multihead_reward_novelty",
    "multihead_reward_reference",
]
