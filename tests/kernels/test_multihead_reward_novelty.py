"""u next to the heads in the fused pass: Triton (interpreted) and the torch reference vs float64."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.multihead_reward import (
    NoveltyTensors,
    multihead_reward,
    multihead_reward_novelty,
    multihead_reward_reference,
    multihead_reward_reference_novelty,
    multihead_reward_triton,
    multihead_reward_triton_novelty,
    triton_available,
)
from model_store.novelty import fit_novelty, novelty_exact

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# (B, T, H, K, rank): B=1, odd H, K=1, non-powers of two; rank None = the full Cholesky form,
# an int = the eigen form with its residual term (R not a power of two, R < BLOCK_R, R > BLOCK_R).
SHAPES = [
    (1, 1, 64, 1, None),
    (3, 17, 97, 5, None),
    (257, 3, 40, 2, None),
    (5, 4, 130, 16, None),
    (2, 5, 97, 3, 7),
    (19, 1, 200, 1, 70),
]


def _inputs(b: int, t: int, h: int, k: int, rank: int | None, seed: int):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(3 * h, h, generator=g, dtype=torch.float64) * torch.linspace(2.0, 0.05, h) + 0.5
    stat = fit_novelty(ref, 0.7, rank=rank)
    nov = NoveltyTensors(stat.basis, stat.coef, stat.resid)
    # half the rows from the reference law, half shifted: u spans in- and out-of-distribution values
    hidden = (
        torch.randn(b, t, h, generator=g, dtype=torch.float64) * torch.linspace(2.0, 0.05, h) + 0.5
    ).float()
    hidden[b // 2 :] += torch.randn(b - b // 2, t, h, generator=g)
    index = torch.randint(0, t, (b,), generator=g)
    weight = torch.randn(k, h, generator=g) / math.sqrt(h)
    bias = torch.randn(k, generator=g)
    return hidden, index, weight, bias, nov, ref, stat


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-K{}-R{}".format(*s))
def test_triton_and_reference_match_float64(shape: tuple) -> None:
    hidden, index, weight, bias, nov, ref, stat = _inputs(*shape, seed=sum(shape[:4]))
    want = multihead_reward_reference_novelty(hidden, index, weight, bias, nov, compute_dtype=torch.float64)
    for got in (
        multihead_reward_triton_novelty(hidden, index, weight, bias, nov),
        multihead_reward_reference_novelty(hidden, index, weight, bias, nov),
    ):
        assert got.novelty.dtype == torch.float32 and got.novelty.shape == (shape[0],)
        torch.testing.assert_close(got.novelty.double(), want.novelty, rtol=1e-5, atol=1e-5)
        for g, w in zip(got.heads, want.heads, strict=True):  # the heads are what they were without u
            torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-5)
    if shape[4] is None:  # the full form is the formula itself (a linear solve in float64)
        pooled = hidden[torch.arange(shape[0]), index]
        torch.testing.assert_close(want.novelty, novelty_exact(pooled, ref, 0.7), rtol=1e-5, atol=1e-6)


def test_pooled_layout_and_dispatch() -> None:
    hidden, index, weight, bias, nov, *_ = _inputs(6, 3, 48, 3, None, seed=5)
    pooled = hidden[torch.arange(6), index].contiguous()
    a = multihead_reward_triton_novelty(pooled, None, weight, bias, nov)
    b = multihead_reward_novelty(hidden, index, weight, bias, nov)  # CPU: the reference
    torch.testing.assert_close(a.novelty, b.novelty, rtol=1e-5, atol=1e-5)


def test_bad_rows_are_nan_in_u_too() -> None:
    hidden, index, weight, bias, nov, *_ = _inputs(4, 3, 40, 2, None, seed=9)
    hidden[1, index[1], 7] = math.nan
    index[3] = 99  # out of range: a NaN row, not a wrapped read
    for fn in (multihead_reward_triton_novelty, multihead_reward_reference_novelty):
        got = fn(hidden, index, weight, bias, nov)
        assert torch.isnan(got.novelty[[1, 3]]).all() and torch.isfinite(got.novelty[[0, 2]]).all()
        assert torch.isnan(got.heads.min[[1, 3]]).all()


def test_without_novelty_nothing_changes() -> None:
    """Absent statistic: the old entry points, bit for bit the same as the heads of the novelty pass."""
    hidden, index, weight, bias, nov, *_ = _inputs(9, 4, 72, 4, None, seed=3)
    plain_t = multihead_reward_triton(hidden, index, weight, bias)
    with_t = multihead_reward_triton_novelty(hidden, index, weight, bias, nov)
    for a, b in zip(plain_t, with_t.heads, strict=True):
        assert torch.equal(a, b)
    plain_r = multihead_reward(hidden, index, weight, bias)
    for a, b in zip(plain_r, multihead_reward_reference(hidden, index, weight, bias), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(
        plain_r, multihead_reward_reference_novelty(hidden, index, weight, bias, nov).heads, strict=True
    ):
        assert torch.equal(a, b)


def test_shape_errors_name_the_tensor() -> None:
    hidden, index, weight, bias, nov, *_ = _inputs(2, 2, 32, 2, None, seed=1)
    with pytest.raises(ValueError, match="novelty.basis"):
        multihead_reward_reference_novelty(
            hidden, index, weight, bias, NoveltyTensors(nov.basis[:, :5], nov.coef, 0.0)
        )
    with pytest.raises(ValueError, match="novelty.coef"):
        multihead_reward_triton_novelty(
            hidden, index, weight, bias, NoveltyTensors(nov.basis, nov.coef[:3], 0.0)
        )
    with pytest.raises(ValueError, match="resid"):
        multihead_reward_reference_novelty(
            hidden, index, weight, bias, NoveltyTensors(nov.basis, nov.coef, -1.0)
        )
