"""All K reward heads and their min/max/mean/std in one pass.

`multihead_reward` is the one public entry point. It dispatches to the Triton kernel for CUDA
tensors and to the torch reference otherwise; `HYDRA_RM_KERNEL=reference` forces the reference
(useful to bisect a numerical difference), `HYDRA_RM_KERNEL=triton` forces the kernel (on CPU that
only works under `TRITON_INTERPRET=1`, which is what the tests do).

The kernel (`_multihead_reward_kernel`), its launcher (`multihead_reward_triton`) and the torch
reference (`multihead_reward_reference`) live side by side so a change to one is reviewed next to the
others. Triton is optional: without it this module still imports and the reference runs.

Semantics shared by both paths:
- `std` is the population standard deviation over heads (correction 0): it is a disagreement
  measure, defined (as 0) for K=1, and UWO uses its square as the variance;
- a row with any non-finite head reward (NaN/inf anywhere in its inputs, or an overflow) comes back
  NaN in every output, so a broken row can never hide behind a finite `min`;
- an `index` outside `[0, T)` gives a NaN row instead of a wrapped or out-of-bounds read (raising
  would need a device sync on every batch).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is all there is.
    triton = None
    tl = None


class HeadOutputs(NamedTuple):
    """Per-head rewards `[B, K]` and their reductions `[B]`, all float32."""

    rewards: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


class NoveltyTensors(NamedTuple):
    """The feature-space novelty statistic as the kernel reads it (model_store/novelty.py):
    u^2 = sum_r coef_r (basis_r . x)^2 + resid * (|x|^2 - sum_r (basis_r . x)^2), clamped at 0."""

    basis: torch.Tensor  # [R, H] float32
    coef: torch.Tensor  # [R] float32
    resid: float


class ScoredRows(NamedTuple):
    """What the fused pass returns when a novelty statistic is given: the heads and u `[B]` (fp32)."""

    heads: HeadOutputs
    novelty: torch.Tensor


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# Past this the [BLOCK_B, BLOCK_K] accumulator and the weight tile stop fitting in registers/shared
# memory at useful block sizes; auto dispatch uses the reference instead.
MAX_TRITON_HEADS = 256


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
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise ValueError(f"index must be an integer tensor, got {index.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [K, H={hidden.shape[-1]}], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one head (K >= 1)")
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must be [K={weight.shape[0]}], got shape {tuple(bias.shape)}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_novelty(novelty: NoveltyTensors, hidden: torch.Tensor) -> None:
    basis, coef, resid = novelty
    if basis.dim() != 2 or basis.shape[1] != hidden.shape[-1] or basis.shape[0] == 0:
        raise ValueError(f"novelty.basis must be [R >= 1, H={hidden.shape[-1]}], got {tuple(basis.shape)}")
    if coef.dim() != 1 or coef.shape[0] != basis.shape[0]:
        raise ValueError(f"novelty.coef must be [R={basis.shape[0]}], got {tuple(coef.shape)}")
    if basis.dtype not in _FLOAT_DTYPES or coef.dtype not in _FLOAT_DTYPES:
        raise ValueError("novelty.basis and novelty.coef must be floating point")
    if not (math.isfinite(resid) and resid >= 0):
        raise ValueError(f"novelty.resid must be finite and >= 0, got {resid}")


def _pool_rows(hidden: torch.Tensor, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pooled rows [B, H] and which rows had an out-of-range index (None without an index)."""
    if index is None:
        return hidden, None
    t = hidden.shape[1]
    index = index.to(hidden.device, torch.long)
    bad_index = (index < 0) | (index >= t)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    # T=0: no valid position; gather zeros of the right width so every row turns NaN (bad_index)
    pooled = (
        hidden[rows, index.clamp(0, t - 1)] if t > 0 else hidden.new_zeros(hidden.shape[0], hidden.shape[2])
    )
    return pooled, bad_index


def novelty_reference(
    pooled: torch.Tensor, novelty: NoveltyTensors, compute_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """u [B] for pooled rows [B, H] (no NaN masking: the caller owns which rows are bad)."""
    basis, coef, resid = novelty
    x = pooled.to(compute_dtype)
    proj = x @ basis.to(compute_dtype).T
    sq = proj * proj
    u2 = sq @ coef.to(compute_dtype)
    if resid:
        u2 = u2 + resid * ((x * x).sum(1) - sq.sum(1))
    return u2.clamp(min=0.0).sqrt()


def multihead_reward_reference_novelty(
    hidden: torch.Tensor,
    index: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    novelty: NoveltyTensors,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> ScoredRows:
    """Torch reference of the pass with novelty: the heads as `multihead_reward_reference` and u
    on the same pooled row; a row that is NaN in the heads is NaN in u too."""
    _check_inputs(hidden, index, weight, bias)
    _check_novelty(novelty, hidden)
    # One gather and one cast of the pooled rows, read by the heads and by u alike.
    pooled, bad_index = _pool_rows(hidden, index)
    x = pooled.to(compute_dtype)
    heads = _heads_reference(x, bad_index, weight, bias, compute_dtype)
    u = novelty_reference(x, novelty, compute_dtype)
    u = u.masked_fill(torch.isnan(heads.rewards[:, 0]) if heads.rewards.shape[0] else u.isnan(), math.nan)
    return ScoredRows(heads, u.float() if compute_dtype == torch.float32 else u)


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
    pooled, bad_index = _pool_rows(hidden, index)
    return _heads_reference(pooled.to(compute_dtype), bad_index, weight, bias, compute_dtype)


def _heads_reference(
    x: torch.Tensor,
    bad_index: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    compute_dtype: torch.dtype,
) -> HeadOutputs:
    """The heads and their reductions on pooled rows `x` [B, H] already in `compute_dtype`."""
    rewards = x @ weight.to(compute_dtype).T + bias.to(compute_dtype)
    bad = ~torch.isfinite(rewards).all(dim=1)
    if bad_index is not None:
        bad |= bad_index
    rewards = rewards.masked_fill(bad[:, None], math.nan)
    if rewards.shape[0] == 0:  # torch.std warns about zero degrees of freedom on an empty batch
        empty = rewards.new_empty(0)
        return HeadOutputs(rewards, empty, empty.clone(), empty.clone(), empty.clone())
    # Invariant: a bad row is NaN everywhere, so a NaN head is never hidden by the pessimistic min.
    return HeadOutputs(
        rewards=rewards,
        min=rewards.amin(dim=1),
        max=rewards.amax(dim=1),
        mean=rewards.mean(dim=1),
        std=rewards.std(dim=1, correction=0),
    )


if triton is not None:
    # The runtime parameters carry no annotations: Triton reads them as types (`int` would force
    # 32-bit strides). ANN001 is waived for this file in pyproject.toml for that reason alone.
    # Per-request sizes are not specialised: Triton would otherwise compile a new variant the first
    # time B or T equals 1 or turns 16-divisible, a stall of seconds in the middle of serving.
    # Nothing in the kernel gains from knowing them (they only bound masks and the index check).
    # H, K and the strides stay specialised: they are fixed per model (stride_hb = T*H is
    # 16-divisible for every T when H is, which is what the vectorised row loads want).
    @triton.jit(do_not_specialize=["B", "T"])
    def _multihead_reward_kernel(
        # inputs: hidden [B, T, H] (or pooled [B, H]), index [B], weight [K, H], bias [K]
        hidden_ptr, index_ptr, weight_ptr, bias_ptr,
        # outputs: rewards [B, K], then min/max/mean/std [B]
        rewards_ptr, min_ptr, max_ptr, mean_ptr, std_ptr,
        # sizes
        B, T, H, K,
        # input strides (hidden: b, t, h; weight: k, h; bias: k)
        stride_hb, stride_ht, stride_hh, stride_wk, stride_wh, stride_bk,
        # output strides (rewards: b, k; then one per reduction)
        stride_rb, stride_rk, stride_min, stride_max, stride_mean, stride_std,
        # novelty (only read when HAS_NOVELTY): basis [R, H], coef [R], resid, output u [B]
        basis_ptr, coef_ptr, u_ptr, resid, R,
        stride_pr, stride_ph, stride_c, stride_u,
        # compile-time switches and tile sizes (launch_config picks them)
        HAS_INDEX: tl.constexpr, EVEN_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_NOVELTY: tl.constexpr = False, HAS_RESID: tl.constexpr = False, BLOCK_R: tl.constexpr = 16,
    ) -> None:  # fmt: skip
        # One program owns BLOCK_B pooled rows and every head. The work is a skinny GEMM
        # ([B, H] x [H, K], K up to 256): memory-bound on the B*H row bytes, so the design is about
        # reading each row once and reading W once per program (amortised over BLOCK_B rows),
        # not about FLOPs. tl.dot (BLOCK_B >= 16) rather than a row-per-program broadcast-sum:
        # a row per program would re-read all of W for every row (K times the row bytes through
        # L2 at K=16), and the broadcast-sum needs a [BLOCK_B, BLOCK_K, BLOCK_H] product in
        # registers. The launcher lowers BLOCK_B towards 16 when B is small so more SMs get work.
        pid = tl.program_id(0)
        offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_h = tl.arange(0, BLOCK_H)
        offs_k = tl.arange(0, BLOCK_K)
        row_ok = offs_b < B
        k_ok = offs_k < K

        # Fused gather: row b reads hidden[b, index[b], :]; no [B, H] copy exists anywhere.
        # 64-bit row offsets: B * T * H overflows int32 on realistic batches.
        row_off = offs_b.to(tl.int64) * stride_hb
        if HAS_INDEX:
            idx = tl.load(index_ptr + offs_b, mask=row_ok, other=0).to(tl.int64)
            idx_ok = (idx >= 0) & (idx < T)
            row_ok_load = row_ok & idx_ok
            row_off += tl.where(idx_ok, idx, 0) * stride_ht
        else:
            idx_ok = offs_b >= 0
            row_ok_load = row_ok

        x_ptrs = hidden_ptr + row_off[:, None] + offs_h[None, :] * stride_hh
        w_ptrs = weight_ptr + offs_k[None, :] * stride_wk + offs_h[:, None] * stride_wh

        acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
        xsq = tl.zeros((BLOCK_B,), dtype=tl.float32)  # |x|^2 for the novelty residual, from the same loads
        for h0 in range(0, H, BLOCK_H):
            if EVEN_H:
                x_mask = row_ok_load[:, None]
                w_mask = k_ok[None, :]
            else:
                h_ok = (h0 + offs_h) < H
                x_mask = row_ok_load[:, None] & h_ok[None, :]
                w_mask = k_ok[None, :] & h_ok[:, None]
            # Upcast right after the load: the interpreter computes bf16 arithmetic wrongly, and
            # fp16/bf16 values are exact in tf32, so the "tf32" dot below loses nothing for them.
            x = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
            if HAS_RESID:
                xsq += tl.sum(x * x, axis=1)
            x_ptrs += BLOCK_H * stride_hh
            w_ptrs += BLOCK_H * stride_wh

        bias = tl.load(bias_ptr + offs_k * stride_bk, mask=k_ok, other=0.0).to(tl.float32)
        rewards = acc + bias[None, :]

        # Reductions over K in registers. Padded heads (k >= K) are neutral: +inf for min, -inf
        # for max, 0 for the sums. tl.min/tl.max may drop NaN, so non-finite rows are detected
        # explicitly and overwritten with NaN; the check is restricted to real heads because a
        # padded head sees inf * 0 = NaN when the row holds an inf.
        valid = k_ok[None, :]
        nonfinite = (rewards != rewards) | (tl.abs(rewards) == float("inf"))
        row_bad = (tl.max(tl.where(valid & nonfinite, 1, 0), axis=1) > 0) | (idx_ok == 0)
        # Head count as a float tensor (K itself may be specialised to the constexpr 1).
        k_f = tl.sum(k_ok.to(tl.float32), axis=0)
        r_min = tl.min(tl.where(valid, rewards, float("inf")), axis=1)
        r_max = tl.max(tl.where(valid, rewards, float("-inf")), axis=1)
        r_mean = tl.div_rn(tl.sum(tl.where(valid, rewards, 0.0), axis=1), k_f)
        dev = tl.where(valid, rewards - r_mean[:, None], 0.0)
        # Two-pass variance from registers: no cancellation, unlike E[x^2] - E[x]^2.
        r_std = tl.sqrt_rn(tl.div_rn(tl.sum(dev * dev, axis=1), k_f))

        nan = float("nan")
        rewards = tl.where(row_bad[:, None], nan, rewards)
        r_min = tl.where(row_bad, nan, r_min)
        r_max = tl.where(row_bad, nan, r_max)
        r_mean = tl.where(row_bad, nan, r_mean)
        r_std = tl.where(row_bad, nan, r_std)

        if HAS_NOVELTY:
            # u^2 = sum_r coef_r (basis_r . x)^2 (+ resid * (|x|^2 - sum_r (basis_r . x)^2)). The same
            # pooled rows, one R block at a time: the row tile comes back from L1/L2 (R / BLOCK_R
            # re-reads of B*H elements), the basis is read once per program like W. Always the exact
            # FMA dot ("ieee"): u is a sum of squares of projections, where tf32 would cost 1e-3.
            offs_r = tl.arange(0, BLOCK_R)
            u2 = tl.zeros((BLOCK_B,), dtype=tl.float32)
            psq = tl.zeros((BLOCK_B,), dtype=tl.float32)
            x_base = hidden_ptr + row_off[:, None] + offs_h[None, :] * stride_hh
            for r0 in range(0, R, BLOCK_R):
                r_ok = (r0 + offs_r) < R
                proj = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
                xp = x_base
                p_ptrs = basis_ptr + (r0 + offs_r)[None, :] * stride_pr + offs_h[:, None] * stride_ph
                for h0 in range(0, H, BLOCK_H):
                    h_ok = (h0 + offs_h) < H
                    xv = tl.load(xp, mask=row_ok_load[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
                    pv = tl.load(p_ptrs, mask=r_ok[None, :] & h_ok[:, None], other=0.0).to(tl.float32)
                    proj = tl.dot(xv, pv, proj, input_precision="ieee")
                    xp += BLOCK_H * stride_hh
                    p_ptrs += BLOCK_H * stride_ph
                c = tl.load(coef_ptr + (r0 + offs_r) * stride_c, mask=r_ok, other=0.0).to(tl.float32)
                sq = proj * proj
                u2 += tl.sum(sq * c[None, :], axis=1)
                if HAS_RESID:
                    psq += tl.sum(sq, axis=1)
            if HAS_RESID:
                u2 += resid * (xsq - psq)
            u = tl.sqrt_rn(tl.maximum(u2, 0.0))
            u = tl.where(row_bad, nan, u)
            tl.store(u_ptr + offs_b * stride_u, u, mask=row_ok)

        r_ptrs = rewards_ptr + offs_b.to(tl.int64)[:, None] * stride_rb + offs_k[None, :] * stride_rk
        tl.store(r_ptrs, rewards, mask=row_ok[:, None] & valid)
        tl.store(min_ptr + offs_b * stride_min, r_min, mask=row_ok)
        tl.store(max_ptr + offs_b * stride_max, r_max, mask=row_ok)
        tl.store(mean_ptr + offs_b * stride_mean, r_mean, mask=row_ok)
        tl.store(std_ptr + offs_b * stride_std, r_std, mask=row_ok)

else:
    _multihead_reward_kernel = None


def triton_available() -> bool:
    """True when the Triton kernel can be imported (it is optional on CPU-only installs)."""
    return triton is not None


def _interpreted() -> bool:
    # Decided when the kernel was decorated: TRITON_INTERPRET must be set before `import triton`.
    return type(_multihead_reward_kernel).__name__ == "InterpretedFunction"


def _tensor_core_path(x_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
    # fp16/bf16 are exact in tf32, so tensor cores cost no accuracy there; fp32/fp64 inputs take
    # the exact-product FMA path so rewards match an fp32 Linear to ~1e-6.
    return x_dtype in _HALF_DTYPES and w_dtype in _HALF_DTYPES


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# Interpreter / unknown device: pretend to be an H100 so the tests exercise the GPU block choices.
H100_SMS, H100_SMEM = 132, 227 * 1024


@functools.lru_cache(maxsize=16)
def device_limits(device: torch.device) -> tuple[int, int]:
    """(SM count, opt-in shared memory per block in bytes) of `device`."""
    if device.type != "cuda":
        return H100_SMS, H100_SMEM
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    if not smem:  # older torch: ask Triton, which is what raises OutOfResources at launch
        smem = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return props.multi_processor_count, int(smem)


def launch_config(
    b: int,
    h: int,
    k: int,
    *,
    x_dtype: torch.dtype = torch.bfloat16,
    w_dtype: torch.dtype = torch.bfloat16,
    n_sm: int = H100_SMS,
    smem_bytes: int = H100_SMEM,
    novelty: bool = False,
) -> dict[str, int]:
    """Block sizes for a launch. A pure function of the problem and the device limits, so the
    benchmark can report what it ran and the tests can check it against other GPUs' limits. With
    `novelty`, also BLOCK_R for the u loop, and the blocks shrink until that loop fits too (it has
    fp32 basis tiles and an exact FMA dot: at sm86's 99 KiB the heads-only config needed 192 KiB)."""
    block_k = max(16, _next_pow2(k))  # tl.dot needs every dimension >= 16
    # Keep the per-stage weight tile at <= 8192 elements so K=64..256 still fits with pipelining.
    block_h = max(16, min(256, 8192 // block_k, _next_pow2(h)))
    # Enough programs for ~2 per SM before growing the row block, which amortises the W reads.
    block_b = max(16, min(64, _next_pow2(-(-b // (2 * n_sm)))))
    stages = 3

    x_bytes, w_bytes = x_dtype.itemsize, w_dtype.itemsize
    fma = not _tensor_core_path(x_dtype, w_dtype)

    def block_r() -> int:  # basis tile [BLOCK_H, BLOCK_R] no bigger than the heads' weight tile
        return max(16, min(64, 8192 // block_h))

    def smem() -> int:
        heads = smem_heads()
        if not novelty:
            return heads
        # The u loop runs after the heads loop and reuses its shared memory: the larger of the two.
        r = block_r()
        tiles_u = (stages - 1) * (block_b * block_h * x_bytes + block_h * r * 4)
        upcast_u = block_b * block_h * 4 if x_bytes != 4 else 0
        return max(heads, tiles_u + upcast_u + block_b * r * 4)

    def smem_heads() -> int:
        # Shared memory Triton allocates (checked against compiled kernels for sm_80/86/90 by
        # tests/kernels/test_multihead_reward_compiles.py): the pipeliner keeps (stages - 1) raw x
        # and w tiles; the FMA dot also stages fp32 copies of operands that are not fp32; the
        # epilogue may stage the accumulator. Summed, so the estimate errs high.
        tiles = (stages - 1) * (block_b * block_h * x_bytes + block_h * block_k * w_bytes)
        upcast = 0
        if fma:
            upcast += block_b * block_h * 4 if x_bytes != 4 else 0
            upcast += block_h * block_k * 4 if w_bytes != 4 else 0
        return tiles + upcast + block_b * block_k * 4

    while smem() > smem_bytes:
        if stages > 2:
            stages -= 1
        elif block_h > 32:
            block_h //= 2
        elif block_b > 16:
            block_b //= 2
        else:
            break
    num_warps = 8 if block_b * block_h >= 16384 or block_b * block_k >= 4096 else 4
    out = {
        "BLOCK_B": block_b,
        "BLOCK_H": block_h,
        "BLOCK_K": block_k,
        "num_warps": num_warps,
        "num_stages": stages,
    }
    if novelty:
        out["BLOCK_R"] = block_r()
    return out


def _empty_outputs(b: int, k: int, device: torch.device) -> HeadOutputs:
    def vec() -> torch.Tensor:
        return torch.empty(b, dtype=torch.float32, device=device)

    rewards = torch.empty(b, k, dtype=torch.float32, device=device)
    return HeadOutputs(rewards, vec(), vec(), vec(), vec())


def multihead_reward_triton(
    hidden: torch.Tensor,
    index: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    out: HeadOutputs | None = None,
    config: Mapping[str, int] | None = None,
    novelty: NoveltyTensors | None = None,
    novelty_out: torch.Tensor | None = None,
) -> HeadOutputs:
    """Launch the fused kernel. `out` takes preallocated fp32 outputs (any strides) so tests can
    poison them; `config` overrides entries of `launch_config` for tests and tuning. With `novelty`,
    u is written into `novelty_out` ([B] fp32; see `multihead_reward_triton_novelty`)."""
    if triton is None:
        raise RuntimeError("the Triton kernel needs the `triton` package (pip install hydra-rm[triton])")
    _check_inputs(hidden, index, weight, bias)
    if not hidden.is_cuda and not _interpreted():
        raise RuntimeError(
            "the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported"
        )
    dev = hidden.device
    for name, t in (("weight", weight), ("bias", bias)):
        if t.device != dev:  # a silent per-batch weight copy would be a performance bug
            raise ValueError(f"{name} is on {t.device} but hidden is on {dev}")
    b, h = hidden.shape[0], hidden.shape[-1]
    k = weight.shape[0]
    if k > MAX_TRITON_HEADS:
        raise ValueError(f"the Triton kernel supports K <= {MAX_TRITON_HEADS} heads, got {k}")

    if out is None:
        out = _empty_outputs(b, k, dev)
    else:
        for name, t, shape in zip(HeadOutputs._fields, out, [(b, k)] + [(b,)] * 4, strict=True):
            if tuple(t.shape) != shape or t.dtype != torch.float32 or t.device != dev:
                raise ValueError(
                    f"out.{name} must be float32 {shape} on {dev}, got {t.dtype} {tuple(t.shape)}"
                )
    if novelty is not None:
        _check_novelty(novelty, hidden)
        if novelty_out is None or tuple(novelty_out.shape) != (b,) or novelty_out.dtype != torch.float32:
            raise ValueError(f"novelty_out must be a float32 [{b}] tensor when novelty is given")
        for name, t in (
            ("novelty.basis", novelty.basis),
            ("novelty.coef", novelty.coef),
            ("novelty_out", novelty_out),
        ):
            if t.device != dev:
                raise ValueError(f"{name} is on {t.device} but hidden is on {dev}")
    if b == 0:
        return out

    has_index = index is not None
    if index is not None:
        index = index.to(dev)
        if index.dtype not in (torch.int32, torch.int64):
            index = index.to(torch.int64)
        index = index.contiguous()  # the kernel reads index[b] at unit stride; B elements at most
        t_len = hidden.shape[1]
        stride_hb, stride_ht, stride_hh = hidden.stride()
    else:
        index = hidden  # any valid pointer; never read when HAS_INDEX is False
        t_len = 1
        stride_hb, stride_hh = hidden.stride()
        stride_ht = 0
    # H offsets are int32 inside the kernel; only row offsets are 64-bit.
    if (h - 1) * abs(stride_hh) >= 2**31 or (k - 1) * abs(weight.stride(0)) + (h - 1) * abs(
        weight.stride(1)
    ) >= 2**31:
        raise ValueError("hidden's H stride or weight's size is too large for 32-bit offsets")

    n_sm, smem_bytes = device_limits(dev)
    cfg = launch_config(
        b, h, k, x_dtype=hidden.dtype, w_dtype=weight.dtype, n_sm=n_sm, smem_bytes=smem_bytes,
        novelty=novelty is not None,
    )  # fmt: skip
    if config:
        unknown = set(config) - set(cfg)
        if unknown:
            raise ValueError(f"unknown launch config keys {sorted(unknown)}; known: {sorted(cfg)}")
        cfg.update(config)
    for name in ("BLOCK_B", "BLOCK_H", "BLOCK_K", "BLOCK_R")[
        : 4 if novelty is not None else 3
    ]:  # tl.dot: 2^n >= 16
        if cfg[name] < 16 or cfg[name] & (cfg[name] - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {cfg[name]}")
    if cfg["BLOCK_K"] < k:
        raise ValueError(f"BLOCK_K={cfg['BLOCK_K']} is smaller than K={k}")
    grid = (triton.cdiv(b, cfg["BLOCK_B"]),)
    rewards, r_min, r_max, r_mean, r_std = out
    kwargs: dict[str, Any] = dict(cfg)
    if novelty is not None:
        assert novelty_out is not None
        basis, coef, resid = novelty
        r = basis.shape[0]
        block_r = min(cfg["BLOCK_R"], max(16, _next_pow2(r)))  # launch_config sized shared memory for it
        nov_args = (basis, coef, novelty_out, float(resid), r,
                    basis.stride(0), basis.stride(1), coef.stride(0), novelty_out.stride(0))  # fmt: skip
        kwargs.update(HAS_NOVELTY=True, HAS_RESID=bool(resid), BLOCK_R=block_r)
    else:  # never read: HAS_NOVELTY is False, the novelty code is compiled out
        nov_args = (bias, bias, r_std, 0.0, 1, 0, 0, 0, 0)
    # Triton launches on the *current* CUDA device, which the service's forward thread never sets:
    # without this, HYDRA_RM_DEVICE=cuda:1 would launch on device 0 with cuda:1 pointers.
    with _launch_device(dev):
        _multihead_reward_kernel[grid](
            hidden,
            index,
            weight,
            bias,
            rewards,
            r_min,
            r_max,
            r_mean,
            r_std,
            b,
            t_len,
            h,
            k,
            stride_hb,
            stride_ht,
            stride_hh,
            weight.stride(0),
            weight.stride(1),
            bias.stride(0),
            rewards.stride(0),
            rewards.stride(1),
            r_min.stride(0),
            r_max.stride(0),
            r_mean.stride(0),
            r_std.stride(0),
            *nov_args,
            HAS_INDEX=has_index,
            EVEN_H=h % cfg["BLOCK_H"] == 0,
            DOT_PRECISION="tf32" if _tensor_core_path(hidden.dtype, weight.dtype) else "ieee",
            **kwargs,
        )
    return out


def multihead_reward_triton_novelty(
    hidden: torch.Tensor,
    index: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    novelty: NoveltyTensors,
    *,
    out: HeadOutputs | None = None,
    config: Mapping[str, int] | None = None,
) -> ScoredRows:
    """The fused kernel with u next to the heads, from the same gathered rows."""
    u = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    heads = multihead_reward_triton(
        hidden, index, weight, bias, out=out, config=config, novelty=novelty, novelty_out=u
    )
    return ScoredRows(heads, u)


def _launch_device(dev: torch.device) -> contextlib.AbstractContextManager[Any]:
    """`dev` as the current CUDA device for a launch (nothing to switch for CPU/interpreter tensors)."""
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def _backend_for(hidden: torch.Tensor, weight: torch.Tensor) -> str:
    choice = os.environ.get("HYDRA_RM_KERNEL", "auto").strip().lower()
    if choice not in {"auto", "reference", "triton"}:
        raise ValueError(f"HYDRA_RM_KERNEL must be auto, reference or triton, got {choice!r}")
    if choice == "auto":
        fits = weight.dim() == 2 and weight.shape[0] <= MAX_TRITON_HEADS
        return "triton" if hidden.is_cuda and triton_available() and fits else "reference"
    return choice


def multihead_reward(
    hidden: torch.Tensor, index: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor
) -> HeadOutputs:
    """Rewards of all K heads for each pooled row, plus min/max/mean/std over heads (fp32).

    `hidden` is `[B, T, H]` with `index [B]` the pooled position of each row, or an already pooled
    `[B, H]` with `index=None`. `weight [K, H]` and `bias [K]` have normalisation folded in.
    """
    if _backend_for(hidden, weight) == "triton":
        return multihead_reward_triton(hidden, index, weight, bias)
    return multihead_reward_reference(hidden, index, weight, bias)


def multihead_reward_novelty(
    hidden: torch.Tensor,
    index: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    novelty: NoveltyTensors,
) -> ScoredRows:
    """`multihead_reward` plus the feature-space novelty u [B] of each pooled row (fp32; NaN where
    the row's heads are NaN). Models without a novelty statistic call `multihead_reward` instead."""
    if _backend_for(hidden, weight) == "triton":
        return multihead_reward_triton_novelty(hidden, index, weight, bias, novelty)
    return multihead_reward_reference_novelty(hidden, index, weight, bias, novelty)
