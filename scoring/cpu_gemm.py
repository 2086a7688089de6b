"""oneDNN prepacked weights for the encoder's linear layers on CPU (issue 18: the peer's speed), opt-in.

On this CPU an fp32 `nn.Linear` through aten (MKL sgemm) runs at ~130 GFLOP/s, while the same product
through oneDNN with the weight reordered once into its blocked layout runs 1.3-1.5x faster at a
repeated shape, and one Qwen2-style forward at a fixed [16, 512] shape 1.18-1.39x. In the engine, with
the shapes real batches have, it bought only 1.04-1.08x on distinct items and cost 0.93-0.95x on GRPO
groups (bench/results/cpu-gemm-ab-cpu.md, 10 paired rounds; why GRPO loses is not found), so it is
off by default (HYDRA_RM_CPU_PACKED_LINEAR).

The layer keeps its `weight` Parameter (state_dict, saving and training see nothing new); the packed
copy is used only where it is exact to use: no autograd, fp32 input, and the very Parameter it was
packed from, unchanged since (its `_version`, bumped by every in-place update, e.g. an optimizer
step), else the layer falls back to aten. Costs one more copy of the packed weights in memory, and up
to 12.5% padded rows (`bucket_rows`).
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PACK_HINT_ROWS = 2048  # the CPU token budget's order (scoring/batching.py); any row count works


def available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@dataclass(frozen=True)
class _Packed:
    weight: weakref.ref  # the Parameter it was packed from (weak: a replaced one may go)
    version: int  # that Parameter's `_version` then
    packed: torch.Tensor  # opaque oneDNN tensor: it cannot be deep-copied, so it lives here


# Beside the modules, not on them: copy.deepcopy of a layer (training's branch copies) then gives a
# plain layer that falls back to aten, instead of failing on the opaque tensor.
_PACKED: weakref.WeakKeyDictionary[nn.Module, _Packed] = weakref.WeakKeyDictionary()


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    p = _PACKED.get(self)
    if (
        p is None
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or p.weight() is not w  # a replaced Parameter
        or w._version != p.version
        or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
    ):
        return F.linear(x, w, self.bias)
    rows = x.numel() // x.shape[-1]
    padded = bucket_rows(rows)
    x2 = x.reshape(rows, x.shape[-1])
    if padded != rows:
        x2 = F.pad(x2, (0, 0, 0, padded - rows))
    y = torch.ops.mkldnn._linear_pointwise(x2, p.packed, self.bias, "none", [], "")
    return y[:rows].reshape(*x.shape[:-1], y.shape[-1])


def bucket_rows(rows: int) -> int:
    """Rows rounded up to one of 8 sizes per octave (<= 12.5% more work). oneDNN builds a primitive
    for every new row count (~1.8 ms here, as long as the product itself at 1,000 rows), and the
    engine's batches have a new count almost every time; buckets bound the set, so its cache hits."""
    if rows <= 64:
        return -(-rows // 16) * 16
    step = 1 << max(rows.bit_length() - 4, 0)
    return -(-rows // step) * step


def pack_linears(module: nn.Module) -> int:
    """Give every fp32 CPU `nn.Linear` under `module` a prepacked twin; how many were packed.
    Idempotent (a packed layer is repacked from its current weight)."""
    if not available():
        return 0
    n = 0
    for lin in module.modules():
        if type(lin) is not nn.Linear or lin.weight.dtype != torch.float32 or lin.weight.device.type != "cpu":
            continue
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), PACK_HINT_ROWS)
        _PACKED[lin] = _Packed(weakref.ref(lin.weight), lin.weight._version, packed)
        lin.forward = types.MethodType(_packed_forward, lin)  # type: ignore[method-assign]
        n += 1
    return n


def is_packed(module: nn.Module) -> bool:
    return module in _PACKED


def unpack_linears(module: nn.Module) -> None:
    """Undo `pack_linears` (the layers go back to aten's forward)."""
    for lin in module.modules():
        if _PACKED.pop(lin, None) is not None:
            del lin.forward  # the instance attribute: the class's forward shows through again
