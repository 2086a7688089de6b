"""Per-head branches on disk and in memory: which modules a branch copies, and how it is saved and loaded.

A branched model (manifest `branches`, format_version 2) is a plain HF sequence classifier, which is
branch 0, plus `branches.safetensors` with branches 1..K-1. A branch is a copy of the encoder's last
`layers` layers and of its pooling tail: the BERT pooler (`pooler` pooling), a decoder's final norm
(`last_token`), or nothing (`first_token` on an encoder without a pooler). How a forward runs the
branches and pools them is scoring/branches.py's; this module only says what a branch IS.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_store.errors import ModelStoreError
from model_store.manifest import BRANCHES_FILE, BranchInfo

# Where the layer list and the pooling tail sit, per architecture family (base_model attributes).
_LAYER_PATHS = ("encoder.layer", "layers", "h")
_TAIL_PATHS = ("pooler", "norm", "ln_f")


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)  # type: ignore[assignment]
        if module is None:
            return None
    return module


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The encoder's (or decoder's) list of transformer layers."""
    base = model.base_model
    for path in _LAYER_PATHS:
        layers = _get(base, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ModelStoreError(
        f"branches need a layer list at base_model.{' / base_model.'.join(_LAYER_PATHS)}; "
        f"{type(model).__name__} has none"
    )


def pool_tail(model: nn.Module) -> nn.Module | None:
    """The module between the last layer and the row the heads read (None: the last layer's output)."""
    base = model.base_model
    for path in _TAIL_PATHS:
        tail = _get(base, path)
        if isinstance(tail, nn.Module):
            return tail
    if getattr(model, "pooler", None) is not None:  # DeBERTa keeps its pooler on the task model
        return model.pooler
    return None


class Branch(nn.Module):
    """One head's own top: `layers` copies of the model's last layers, and its pooling tail."""

    def __init__(self, layers: nn.ModuleList, tail: nn.Module | None) -> None:
        super().__init__()
        self.layers = layers
        self.tail = tail


def check_branchable(model: nn.Module, num_layers: int) -> None:
    """Refuse (with the reason) a model whose last `num_layers` layers cannot be branched."""
    n = len(layer_stack(model))
    if not 1 <= num_layers < n:
        raise ModelStoreError(
            f"branches of {num_layers} layers: the model has {n} layers, and at least one must stay shared"
        )
    classifier = getattr(model, "classifier", None)
    if classifier is not None and not isinstance(classifier, nn.Linear):  # RoBERTa's dense+tanh head
        raise ModelStoreError(
            f"{type(model).__name__} pools through a classifier block; branches support models whose "
            "head is one linear layer (BERT-style encoders and score-headed decoders)"
        )


def copy_branches(model: nn.Module, num_layers: int, k: int) -> nn.ModuleList:
    """K-1 new branches, each a copy of the model's own last `num_layers` layers and tail (branch 0 is
    the model itself): what training starts from, and the shape loading fills."""
    check_branchable(model, num_layers)
    top = layer_stack(model)[-num_layers:]
    tail = pool_tail(model)
    return nn.ModuleList(Branch(copy.deepcopy(nn.ModuleList(top)), copy.deepcopy(tail)) for _ in range(k - 1))


def save_branches(branches: nn.ModuleList, directory: Path) -> Path:
    """Write branches 1..K-1 as `{j}.layers.{i}.*` / `{j}.tail.*` (j from 1) in safetensors."""
    from safetensors.torch import save_file

    tensors = {
        f"{j}.{name}": t.detach().cpu().contiguous()
        for j, br in enumerate(branches, start=1)
        for name, t in br.state_dict().items()
    }
    path = Path(directory) / BRANCHES_FILE
    save_file(tensors, str(path))
    return path


def load_branches(model: nn.Module, info: BranchInfo, directory: Path, k: int) -> nn.ModuleList:
    """Branches 1..K-1 from `branches.safetensors`, every tensor present, used and finite, in the
    model's dtype and on its device."""
    from safetensors.torch import load_file

    path = Path(directory) / info.file
    if not path.is_file():
        raise ModelStoreError(f"{path} is missing but the manifest describes {k - 1} branches")
    branches = copy_branches(model, info.layers, k)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # a truncated or non-safetensors file
        raise ModelStoreError(f"{path} is not a readable safetensors file: {type(e).__name__}: {e}") from e
    want = {f"{j}.{name}" for j, br in enumerate(branches, start=1) for name in br.state_dict()}
    missing, unused = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or unused:
        raise ModelStoreError(
            f"{path} does not match the manifest's {k - 1} branches of {info.layers} layers: "
            + (f"missing {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}" if missing else "")
            + ("; " if missing and unused else "")
            + (f"unused {', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}" if unused else "")
        )
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ModelStoreError(f"{path}: NaN or inf in {', '.join(bad[:3])}: the file is corrupted")
    ref = next(model.parameters())
    for j, br in enumerate(branches, start=1):
        own = {name: tensors[f"{j}.{name}"] for name in br.state_dict()}
        try:
            br.load_state_dict(own, strict=True)
        except RuntimeError as e:  # a shape that does not fit the config
            raise ModelStoreError(f"{path}: branch {j} does not fit the model: {e}") from e
    return branches.to(device=ref.device, dtype=ref.dtype).eval()


def attach_branches(directory: Path, branches: nn.ModuleList, num_layers: int) -> None:
    """Write `branches.safetensors` and the manifest's `branches` block (format_version 2) into a model
    directory whose checkpoint is branch 0 (a default manifest for K heads if it has none); listed
    checksums are recomputed so it still verifies."""
    from model_store.manifest import RewardManifest, checksum_tree

    directory = Path(directory)
    # No manifest yet: the default one for K heads, as the loader would resolve it.
    manifest = RewardManifest.read(directory) or RewardManifest.default_for(len(branches) + 1)
    if len(branches) != manifest.num_heads - 1:
        raise ValueError(f"{len(branches)} branches for {manifest.num_heads} heads (branch 0 is the model)")
    save_branches(branches, directory)
    update: dict[str, object] = {"branches": BranchInfo(layers=num_layers), "format_version": 2}
    if manifest.files:
        update["files"] = checksum_tree(directory)
    RewardManifest.model_validate(manifest.model_dump() | update).write(directory)


def branch_twin(model: nn.Module, branches: nn.ModuleList, j: int) -> nn.Module:
    """A plain HF model whose logits[:, j] are head j of the branched model: the checkpoint with
    branch j's layers and tail swapped in (j = 0: the checkpoint itself). The reference of the tests."""
    twin = copy.deepcopy(model)
    if j == 0:
        return twin
    br = branches[j - 1]
    layers = layer_stack(twin)
    n = len(br.layers)
    for i in range(n):
        layers[len(layers) - n + i] = copy.deepcopy(br.layers[i])
    base = twin.base_model
    for path in _TAIL_PATHS:
        if isinstance(_get(base, path), nn.Module):
            setattr(base, path, copy.deepcopy(br.tail))
            break
    else:
        if getattr(twin, "pooler", None) is not None:
            twin.pooler = copy.deepcopy(br.tail)
    return twin.eval()
