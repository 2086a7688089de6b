"""The novelty u compiled on a GPU: the fused kernel against the float64 reference, including the
hidden size of a 7-8B model (H=4096), where the full inverse-Cholesky form is 64 MiB in fp32."""

from __future__ import annotations

import functools
import importlib
import math

import pytest
import torch

mr = importlib.import_module("kernels.multihead_reward")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not mr.triton_available() or mr._interpreted(),
    reason="needs a CUDA GPU, triton, and TRITON_INTERPRET=0",
)

# (B, T, H, K, rank): rank None = the full Cholesky form; an int = the low-rank eigen form.
SHAPES = [
    (1, 1, 64, 1, None),
    (3, 17, 97, 5, None),
    (257, 3, 40, 2, None),
    (33, 2, 4096, 4, None),
    (64, 1, 4096, 4, 256),
    (19, 1, 200, 1, 70),
]


@functools.cache
def _stat(h: int, rank: int | None):
    """One fit per (H, rank): at H=4096 a float64 fit takes seconds on the host."""
    from model_store.novelty import fit_novelty

    g = torch.Generator().manual_seed(h)
    scale = torch.linspace(2.0, 0.05, h, dtype=torch.float64)
    return fit_novelty(
        torch.randn(2 * h + 64, h, generator=g, dtype=torch.float64) * scale + 0.5, 0.7, rank=rank
    )


def _inputs(b: int, t: int, h: int, k: int, rank: int | None, dtype: torch.dtype):
    g = torch.Generator().manual_seed(b + t + h + k)
    scale = torch.linspace(2.0, 0.05, h, dtype=torch.float64)
    stat = _stat(h, rank)
    nov = mr.NoveltyTensors(stat.basis.cuda(), stat.coef.cuda(), stat.resid)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64) * scale + 0.5
    hidden[b // 2 :] += torch.randn(b - b // 2, t, h, generator=g, dtype=torch.float64)
    index = torch.randint(0, t, (b,), generator=g)
    weight = torch.randn(k, h, generator=g) / math.sqrt(h)
    bias = torch.randn(k, generator=g)
    return hidden.to(dtype).cuda(), index.cuda(), weight.to(dtype).cuda(), bias.cuda(), nov


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-K{}-R{}".format(*s))
def test_compiled_novelty_matches_float64(shape: tuple, dtype: torch.dtype) -> None:
    hidden, index, weight, bias, nov = _inputs(*shape, dtype=dtype)
    got = mr.multihead_reward_triton_novelty(hidden, index, weight, bias, nov)
    want = mr.multihead_reward_reference_novelty(
        hidden, index, weight, bias, nov, compute_dtype=torch.float64
    )
    # fp32 inputs: the 1e-5; bf16 inputs are read exactly and computed in fp32 as well, so the
    # same bound holds for u (its inputs are the stored bf16 values, which the reference reads too).
    torch.testing.assert_close(got.novelty.double(), want.novelty, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.heads.min.double(), want.heads.min, rtol=2e-5, atol=2e-5)


def test_dispatch_on_cuda_uses_the_kernel_and_keeps_heads_bitwise() -> None:
    hidden, index, weight, bias, nov = _inputs(9, 4, 256, 4, None, torch.float32)
    plain = mr.multihead_reward_triton(hidden, index, weight, bias)
    both = mr.multihead_reward_novelty(hidden, index, weight, bias, nov)
    for a, b in zip(plain, both.heads, strict=True):
        assert torch.equal(a, b)
