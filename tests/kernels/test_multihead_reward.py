"""The fused multi-head reward kernel against a float64 torch oracle, under TRITON_INTERPRET=1.

Shapes are a covering subset rather than the full cartesian product (~6x as many interpreter runs):
every (B, H, K) triple runs once per dtype, and T, layout (gathered/pooled) and strides rotate
across those runs. `test_case_grid_covers_every_value` guards the coverage.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from kernels.multihead_reward import (
    HeadOutputs,
    multihead_reward,
    multihead_reward_reference,
    multihead_reward_triton,
    triton_available,
)

# `kernels.multihead_reward` the attribute is the function (re-exported by the package), not the module.
mr = importlib.import_module("kernels.multihead_reward")

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

BS = (1, 3, 64, 257)
HS = (64, 384, 1000, 4096)
KS = (1, 2, 5, 8, 16, 64)
TS = (1, 17)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (layout, T, strided): "gathered" is [B, T, H] + index, "pooled" is [B, H] with index=None.
VARIANTS = (
    ("gathered", 1, False),
    ("gathered", 17, False),
    ("gathered", 1, True),
    ("gathered", 17, True),
    ("pooled", None, False),
    ("pooled", None, True),
)
# fp16/bf16 values are exact in fp32 and the products of two such values are exact too, so every
# dtype sees only fp32 accumulation error; fp32 inputs add the rounding of each product.
TOL = {
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
    torch.float16: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1e-5, "atol": 1e-5},
}


@dataclass(frozen=True)
class Case:
    b: int
    h: int
    k: int
    t: int | None
    layout: str
    strided: bool
    dtype: torch.dtype
    seed: int

    @property
    def id(self) -> str:
        t = f"T{self.t}" if self.t is not None else "pooled"
        lay = "strided" if self.strided else "contig"
        return f"B{self.b}-H{self.h}-K{self.k}-{t}-{lay}-{str(self.dtype).removeprefix('torch.')}"


def _cases() -> list[Case]:
    cases = []
    for i, (b, h, k) in enumerate(itertools.product(BS, HS, KS)):
        for j, dtype in enumerate(DTYPES):
            layout, t, strided = VARIANTS[(i + 2 * j) % len(VARIANTS)]
            cases.append(Case(b, h, k, t, layout, strided, dtype, seed=1000 * i + j))
    return cases


CASES = _cases()


def _make_inputs(c: Case) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Fresh random inputs (never zeros); strided variants also vary weight/bias/index layout."""
    g = torch.Generator().manual_seed(c.seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    if c.layout == "gathered":
        if c.strided:  # time-major storage, every other H element: no unit stride anywhere
            hidden = randn(c.t, c.b, 2 * c.h).to(c.dtype).permute(1, 0, 2)[:, :, ::2]
        else:
            hidden = randn(c.b, c.t, c.h).to(c.dtype)
        index_dtype = torch.int32 if c.seed % 2 else torch.int64
        index = torch.randint(0, c.t, (c.b,), generator=g).to(index_dtype)
    else:
        hidden = randn(c.h, c.b).to(c.dtype).t() if c.strided else randn(c.b, c.h).to(c.dtype)
        index = None
    scale = 1.0 / math.sqrt(c.h)
    if c.strided:
        weight = (randn(c.h, c.k) * scale).to(c.dtype).t()
        bias = randn(2 * c.k).to(c.dtype)[::2]
    else:
        weight = (randn(c.k, c.h) * scale).to(c.dtype)
        bias = randn(c.k).to(c.dtype)
    # Shift every head far from 0 on some cases: a padded head leaking a 0 into min/max shows up.
    shift = (0.0, 20.0, -20.0)[c.seed % 3]
    bias = bias + torch.tensor(shift, dtype=c.dtype)
    return hidden, index, weight, bias


def _poisoned(b: int, k: int, value: float = math.nan, *, rewards_transposed: bool = False) -> HeadOutputs:
    """Outputs pre-filled with `value`, so an element the kernel forgets to write is caught."""
    rewards = torch.full((k, b), value).t() if rewards_transposed else torch.full((b, k), value)
    return HeadOutputs(rewards, *(torch.full((b,), value) for _ in range(4)))


def _assert_matches(got: HeadOutputs, want: HeadOutputs, **tol: float) -> None:
    for name, g, w in zip(HeadOutputs._fields, got, want, strict=True):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(
            g.double(), w.double(), equal_nan=True, msg=lambda m, n=name: f"{n}: {m}", **tol
        )


@pytest.fixture(autouse=True)
def _interpreter_active() -> None:
    # Without the interpreter the launcher would refuse CPU tensors; fail loudly rather than skip.
    assert mr._interpreted(), "TRITON_INTERPRET=1 was not set before triton was imported"


def test_case_grid_covers_every_value():
    assert {c.b for c in CASES} == set(BS)
    assert {c.h for c in CASES} == set(HS)
    assert {c.k for c in CASES} == set(KS)
    assert {c.t for c in CASES if c.t is not None} == set(TS)
    for dtype in DTYPES:
        got = {(c.layout, c.t, c.strided) for c in CASES if c.dtype == dtype}
        assert got == set(VARIANTS), dtype
        assert {(c.b, c.h, c.k) for c in CASES if c.dtype == dtype} == set(itertools.product(BS, HS, KS))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_float64_reference(case: Case):
    hidden, index, weight, bias = _make_inputs(case)
    got = multihead_reward_triton(hidden, index, weight, bias, out=_poisoned(case.b, case.k))
    want = multihead_reward_reference(hidden, index, weight, bias, compute_dtype=torch.float64)
    assert all(torch.isfinite(t).all() for t in want)  # so a NaN-poisoned output cannot match
    _assert_matches(got, want, **TOL[case.dtype])


@pytest.mark.parametrize(
    ("b", "h", "k", "block_b", "block_h"),
    [(257, 1000, 5, 32, 64), (257, 384, 16, 64, 128), (3, 4096, 64, 16, 16), (64, 1000, 100, 16, 32)],
)
def test_block_size_overrides_and_large_k(b, h, k, block_b, block_h):
    c = Case(b, h, k, 17, "gathered", True, torch.bfloat16, seed=b + h + k)
    hidden, index, weight, bias = _make_inputs(c)
    out = _poisoned(b, k, rewards_transposed=True)  # non-contiguous output strides too
    cfg = {"BLOCK_B": block_b, "BLOCK_H": block_h, "num_warps": 8}
    got = multihead_reward_triton(hidden, index, weight, bias, out=out, config=cfg)
    want = multihead_reward_reference(hidden, index, weight, bias, compute_dtype=torch.float64)
    _assert_matches(got, want, **TOL[torch.bfloat16])


def test_strided_index_and_fp64_hidden():
    c = Case(7, 384, 5, 17, "gathered", True, torch.float64, seed=9)
    hidden, index, weight, bias = _make_inputs(c)
    index = torch.stack([index, index.flip(0)], dim=1)[:, 0]  # a view with stride 2
    assert index.stride() == (2,)
    got = multihead_reward_triton(hidden, index, weight, bias, out=_poisoned(7, 5))
    want = multihead_reward_reference(hidden, index, weight, bias, compute_dtype=torch.float64)
    _assert_matches(got, want, **TOL[torch.float32])


def test_mixed_dtypes_half_hidden_with_fp64_weight():
    c = Case(5, 384, 8, 17, "gathered", False, torch.float16, seed=7)
    hidden, index, weight, bias = _make_inputs(c)
    weight, bias = weight.double() * (1 + 1e-3 * torch.rand(weight.shape, dtype=torch.float64)), bias.float()
    got = multihead_reward_triton(hidden, index, weight, bias, out=_poisoned(5, 8))
    want = multihead_reward_reference(hidden, index, weight, bias, compute_dtype=torch.float64)
    _assert_matches(got, want, **TOL[torch.float32])


def test_allocates_fp32_outputs_without_out():
    c = Case(3, 64, 2, 17, "gathered", False, torch.bfloat16, seed=3)
    got = multihead_reward_triton(*_make_inputs(c))
    assert got.rewards.shape == (3, 2) and all(t.shape == (3,) for t in got[1:])
    assert all(t.dtype == torch.float32 for t in got)
    _assert_matches(
        got, multihead_reward_reference(*_make_inputs(c), compute_dtype=torch.float64), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_empty_batch(impl):
    hidden, weight, bias = torch.randn(0, 4, 64), torch.randn(3, 64), torch.randn(3)
    fn = multihead_reward_triton if impl == "triton" else multihead_reward_reference
    got = fn(hidden, torch.zeros(0, dtype=torch.long), weight, bias)
    assert got.rewards.shape == (0, 3) and got.min.shape == (0,)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_zero_length_sequences_give_nan_rows(impl):
    """T=0: no position is valid, so every row is NaN in every output (the index rule), on both paths."""
    hidden, weight, bias = torch.randn(3, 0, 64), torch.randn(5, 64), torch.randn(5)
    got = _run(impl, hidden, torch.zeros(3, dtype=torch.long), weight, bias)
    assert got.rewards.shape == (3, 5) and all(t.shape == (3,) for t in got[1:])
    for name, t in zip(HeadOutputs._fields, got, strict=True):
        assert torch.isnan(t).all(), name


def _run(impl: str, hidden, index, weight, bias) -> HeadOutputs:
    if impl == "triton":
        # A finite sentinel, not NaN, so a NaN in the output was really written by the kernel.
        return multihead_reward_triton(
            hidden, index, weight, bias, out=_poisoned(hidden.shape[0], weight.shape[0], 7.0)
        )
    return multihead_reward_reference(hidden, index, weight, bias)


def _nan_case(k: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden, index, weight, bias = _make_inputs(Case(6, 100, k, 5, "gathered", False, torch.float32, seed=11))
    return hidden, index, weight, bias


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_nan_or_inf_in_a_pooled_row_makes_only_that_row_nan(impl):
    hidden, index, weight, bias = _nan_case()
    hidden[1, index[1], 7] = math.nan
    hidden[2, index[2], 3] = math.inf
    hidden[3, index[3], 0] = -math.inf
    hidden[4, (index[4] + 1) % 5, :] = math.nan  # not the pooled position: must not matter
    got = _run(impl, hidden, index, weight, bias)
    for row in (1, 2, 3):
        for name, t in zip(HeadOutputs._fields, got, strict=True):
            assert torch.isnan(t[row]).all(), (name, row)
    clean = [0, 4, 5]
    want = multihead_reward_reference(hidden[clean], index[clean], weight, bias, compute_dtype=torch.float64)
    _assert_matches(HeadOutputs(*(t[clean] for t in got)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_a_nan_head_is_never_dropped_by_min_or_max(impl):
    hidden, index, weight, bias = _nan_case()
    bias[2] = math.nan  # one bad head, the other four finite
    weight[4, 9] = math.inf
    got = _run(impl, hidden, index, weight, bias)
    for name, t in zip(HeadOutputs._fields, got, strict=True):
        assert torch.isnan(t).all(), name


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_overflowing_reward_makes_the_row_nan(impl):
    hidden, index, weight, bias = _nan_case()
    hidden[0, index[0], 0] = 1e30  # finite input...
    weight[:, 0] = 0.0
    weight[2, 0] = 1e10  # ...that overflows fp32 in head 2 of row 0 only
    got = _run(impl, hidden, index, weight, bias)
    assert all(torch.isnan(t[0]).all() for t in got)
    assert all(torch.isfinite(t[1:]).all() for t in got)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_out_of_range_index_gives_nan_row_without_reading_out_of_bounds(impl):
    hidden, index, weight, bias = _nan_case()
    index[1], index[4] = -1, 5  # T == 5
    got = _run(impl, hidden, index, weight, bias)
    for row in (1, 4):
        assert all(torch.isnan(t[row]).all() for t in got), row
    clean = [0, 2, 3, 5]
    want = multihead_reward_reference(hidden[clean], index[clean], weight, bias, compute_dtype=torch.float64)
    _assert_matches(HeadOutputs(*(t[clean] for t in got)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_single_head_has_zero_std_and_degenerate_reductions(impl):
    hidden, index, weight, bias = _nan_case(k=1)
    got = _run(impl, hidden, index, weight, bias)
    assert torch.equal(got.std, torch.zeros(6))
    for t in (got.min, got.max, got.mean):
        torch.testing.assert_close(t, got.rewards[:, 0])


# -- dispatch ---------------------------------------------------------------------------------------


@pytest.fixture
def spy_triton(monkeypatch):
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        return multihead_reward_reference(*args)

    monkeypatch.setattr(mr, "multihead_reward_triton", fake)
    return calls


def _small():
    return _make_inputs(Case(3, 64, 4, 17, "gathered", False, torch.float32, seed=5))


def test_auto_uses_reference_for_cpu_tensors(monkeypatch, spy_triton):
    monkeypatch.delenv("HYDRA_RM_KERNEL", raising=False)
    multihead_reward(*_small())
    monkeypatch.setenv("HYDRA_RM_KERNEL", "auto")
    multihead_reward(*_small())
    assert spy_triton == []


def test_env_switch_forces_reference(monkeypatch, spy_triton):
    monkeypatch.setenv("HYDRA_RM_KERNEL", "Reference ")
    got = multihead_reward(*_small())
    assert spy_triton == []
    _assert_matches(got, multihead_reward_reference(*_small()), rtol=0, atol=0)


def test_env_switch_forces_triton_through_public_api(monkeypatch):
    monkeypatch.setenv("HYDRA_RM_KERNEL", "triton")
    got = multihead_reward(*_small())
    _assert_matches(
        got, multihead_reward_reference(*_small(), compute_dtype=torch.float64), rtol=1e-5, atol=1e-5
    )


def test_invalid_env_switch_raises(monkeypatch):
    monkeypatch.setenv("HYDRA_RM_KERNEL", "cuda")
    with pytest.raises(ValueError, match="HYDRA_RM_KERNEL"):
        multihead_reward(*_small())


def test_module_imports_and_falls_back_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from kernels.multihead_reward import multihead_reward, triton_available\n"
        "assert not triton_available()\n"
        "out = multihead_reward(torch.randn(2, 3, 8), torch.tensor([0, 2]), torch.randn(4, 8), torch.randn(4))\n"
        "assert out.rewards.shape == (2, 4)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"HYDRA_RM_KERNEL": "auto"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(_repo_root()), env=env, timeout=120)


def _repo_root():
    from pathlib import Path

    return Path(mr.__file__).resolve().parents[1]


# -- validation -------------------------------------------------------------------------------------


def _bad_inputs():
    hidden, index, weight, bias = _small()
    return [
        ("must be \\[B, T, H\\]", (hidden[0], index, weight, bias)),
        ("must be \\[B, H\\]", (hidden, None, weight, bias)),
        ("index must be \\[B=3\\]", (hidden, index[:2], weight, bias)),
        ("integer", (hidden, index.float(), weight, bias)),
        ("weight must be \\[K, H=64\\]", (hidden, index, weight[:, :10], bias)),
        ("at least one head", (hidden, index, weight[:0], bias[:0])),
        ("bias must be \\[K=4\\]", (hidden, index, weight, bias[:3])),
        ("hidden must be float", (hidden.long(), index, weight, bias)),
    ]


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("n", range(8))
def test_shape_and_dtype_validation(impl, n):
    match, args = _bad_inputs()[n]
    fn = multihead_reward_triton if impl == "triton" else multihead_reward_reference
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_launcher_rejects_bad_out_and_foreign_devices():
    hidden, index, weight, bias = _small()
    with pytest.raises(ValueError, match="out.rewards"):
        multihead_reward_triton(hidden, index, weight, bias, out=_poisoned(3, 5))
    with pytest.raises(ValueError, match="weight is on meta"):
        multihead_reward_triton(hidden, index, weight.to("meta"), bias)
    with pytest.raises(ValueError, match="unknown launch config"):
        multihead_reward_triton(hidden, index, weight, bias, config={"BLOCK_M": 16})
    with pytest.raises(ValueError, match="power of two"):
        multihead_reward_triton(hidden, index, weight, bias, config={"BLOCK_H": 24})
    with pytest.raises(ValueError, match="smaller than K"):
        multihead_reward_triton(hidden, index, torch.randn(17, 64), torch.randn(17), config={"BLOCK_K": 16})
    with pytest.raises(ValueError, match="K <= 256"):
        multihead_reward_triton(hidden, index, torch.randn(257, 64), torch.randn(257))
