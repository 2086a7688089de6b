"""Load a reward model from a store name, a local path, a hub id, or the embedded default."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_store.branches import load_branches
from model_store.errors import ChecksumMismatch, ModelNotFound, ModelStoreError, UnsafeModel
from model_store.manifest import BRANCHES_FILE, MANIFEST_NAME, RewardManifest, resolve_manifest
from model_store.novelty import NoveltyStat, load_novelty
from model_store.store import ModelStore, check_weights_safe, verify_checksums

log = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "merges.txt"]


@dataclass
class RewardModel:
    """A loaded checkpoint: HF model + tokenizer + manifest, and where it came from."""

    model: Any
    tokenizer: Any
    manifest: RewardManifest
    name: str
    version: str
    path: Path
    info: dict[str, Any] = field(default_factory=dict)
    novelty: NoveltyStat | None = None  # the manifest's feature-space statistic, on the model's device
    branches: Any = None  # nn.ModuleList of branches 1..K-1 (model_store/branches.py), or None


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_source(
    spec: str | None, store: ModelStore, *, allow_pickle: bool = False, trust_remote_code: bool = False
) -> tuple[Path, str, str, bool]:
    """Map a model spec to (directory, name, version, from_store).

    Order: the default (by name too: published on first use); a bare store name (`name` or `name:version`, before any same-named local
    directory, so a stray folder in the working directory cannot shadow a verified model); a local
    directory; a hub id `org/name` (optionally `@revision`).
    """
    from model_store.default_model import DEFAULT_NAME, DEFAULT_VERSION, ensure_default_model

    if spec is None or spec in {"", "default"}:
        ref = ensure_default_model(store)
        return ref.path, ref.name, ref.version, True
    if spec in {DEFAULT_NAME, f"{DEFAULT_NAME}:{DEFAULT_VERSION}"} and not store.contains(spec):
        ensure_default_model(store)  # naming the default is a use too (`train --base hydra-default`)
    if "/" not in spec and not spec.startswith((".", "~")) and store.contains(spec):
        ref = store.resolve(spec)
        return ref.path, ref.name, ref.version, True
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve(), path.name, "local", False
    if _looks_like_hub_id(spec.split("@", 1)[0]):
        repo_id, _, revision = spec.partition("@")
        path = _download_from_hub(
            repo_id, revision or None, allow_pickle=allow_pickle, code=trust_remote_code
        )
        return path, repo_id, revision or "hub", False
    raise ModelNotFound(
        f"model {spec!r} is neither in the store at {store.root}, nor a directory, nor a hub id (org/name)"
    )


def _download_from_hub(repo_id: str, revision: str | None, *, allow_pickle: bool, code: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise ModelNotFound(f"cannot fetch {repo_id!r}: huggingface_hub is not installed") from e
    patterns = _HUB_PATTERNS + (["*.bin"] if allow_pickle else []) + (["*.py"] if code else [])
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # network errors, 404s, gated repos: all mean "cannot load this"
        raise ModelNotFound(f"could not fetch {repo_id!r} from the hub: {type(e).__name__}: {e}") from e


def default_max_length(config: Any, tokenizer: Any, cap: int = 8192) -> int:
    """Usable positions when no manifest says: the model's and the tokenizer's limits, capped."""
    limit = getattr(config, "max_position_embeddings", None) or cap
    if (
        "roberta" in str(getattr(config, "model_type", ""))
        or getattr(config, "model_type", "") == "camembert"
    ):
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1  # positions start after padding_idx
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        limit = min(limit, tok_limit)
    return max(8, min(limit, cap))


def verified_source(
    spec: str | None,
    store: ModelStore,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    verify: bool = True,
) -> tuple[Path, str, str, RewardManifest | None]:
    """Resolve a spec to a checked directory (no pickles unless allowed, checksums, no custom code
    unless trusted) without loading any weights: (path, name, version, manifest). The torch engine
    loads from it; the vLLM engine hands the directory to vLLM."""
    path, name, version, from_store = resolve_source(
        spec, store, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    check_weights_safe(path, allow_pickle=allow_pickle)
    manifest = RewardManifest.read(path)
    if from_store and manifest is None:
        raise ChecksumMismatch(
            f"{path} is in the store but has no {MANIFEST_NAME}: refusing to load unverified"
        )
    # Store versions always carry checksums; a local checkpoint is verified when its manifest has them.
    if manifest is not None and verify and (from_store or manifest.files):
        verify_checksums(path, manifest)
    cfg_json = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    if cfg_json.get("auto_map") and not trust_remote_code:
        raise UnsafeModel(
            f"{path} needs custom code (config auto_map); set HYDRA_RM_TRUST_REMOTE_CODE=true if you trust it"
        )
    return path, name, version, manifest


def load_reward_model(
    spec: str | None,
    store: ModelStore,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> RewardModel:
    """Load and verify; raises a ModelStoreError subclass with a message meant for an operator."""
    path, name, version, manifest = verified_source(
        spec, store, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, verify=verify
    )
    model, loading = _load_weights(
        path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, dtype=dtype
    )
    tokenizer = _load_tokenizer(path, trust_remote_code)
    check_loading_info(loading, path)
    check_finite_weights(model, path)
    check_vocabulary(model, tokenizer, path)
    k = int(model.config.num_labels)
    defaults = {} if manifest is not None else {"max_length": default_max_length(model.config, tokenizer)}
    manifest = resolve_manifest(manifest, k, **defaults)
    if manifest.branches is None and (path / BRANCHES_FILE).exists():
        raise ModelStoreError(
            f"{path} holds {BRANCHES_FILE} but its manifest declares no branches: every head would be "
            "served from the checkpoint's own layers (add the manifest's `branches` block, or remove the file)"
        )
    branches = load_branches(model, manifest.branches, path, k) if manifest.branches is not None else None
    novelty = _load_novelty(path, manifest, model, device)
    model.to(device)
    model.eval()
    if branches is not None:
        branches.to(device)
    attn = str(getattr(model.config, "_attn_implementation", None) or "eager")
    log.info("loaded %s (%s) on %s in %s with %s attention", name, type(model).__name__, device, dtype, attn)
    return RewardModel(
        model=model,
        tokenizer=tokenizer,
        manifest=manifest,
        name=name,
        version=version,
        path=path,
        info={
            "model_type": model.config.model_type,
            "architecture": type(model).__name__,
            "attn_implementation": attn,
        },
        novelty=novelty,
        branches=branches,
    )


def _load_weights(
    path: Path, *, allow_pickle: bool, trust_remote_code: bool, dtype: torch.dtype
) -> tuple[Any, dict[str, Any]]:
    """The sequence-classification model and transformers' loading info (missing/unused keys)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        load_kw: dict[str, Any] = dict(
            config=config,
            dtype=dtype,
            use_safetensors=not allow_pickle or any(path.glob("*.safetensors")),
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
        # Attention chosen explicitly, never left to a library default that changes between releases:
        # sdpa (fused flash/memory-efficient kernels on CUDA, same logits as eager within float
        # rounding: the engine's HF-parity tests run on it) where the architecture has it, else eager.
        try:
            return AutoModelForSequenceClassification.from_pretrained(
                path, attn_implementation="sdpa", **load_kw
            )
        except (ValueError, ImportError) as e:
            if "sdpa" not in str(e) and "scaled_dot_product" not in str(e):
                raise
            log.info("%s has no sdpa attention (%s); using eager", path, _first_line(e))
            return AutoModelForSequenceClassification.from_pretrained(
                path, attn_implementation="eager", **load_kw
            )
    except ModelStoreError:
        raise
    except Exception as e:
        raise ModelStoreError(f"failed to load the model weights from {path}: {type(e).__name__}: {e}") from e


def _load_tokenizer(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelStoreError(
            f"failed to load the tokenizer from {path} (tokenizer.json or the tokenizer's vocabulary "
            f"files missing or broken?): {type(e).__name__}: {_first_line(e)}"
        ) from e


def check_loading_info(loading: dict[str, Any], path: Path) -> None:
    """Every weight the config needs was in the files, and every weight in the files is used."""
    absent = sorted(
        {
            *loading.get("missing_keys", ()),
            *(str(m[0]) if isinstance(m, tuple) else str(m) for m in loading.get("mismatched_keys", ())),
        }
    )
    if absent:  # transformers fills these with fresh random values: rewards would change at every load
        raise ModelStoreError(
            f"{path} has no weights for {', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}: they would "
            "be initialised at random on every load. Save the whole sequence-classification model "
            "(encoder and heads) with save_pretrained"
        )
    unused = sorted(str(k) for k in loading.get("unexpected_keys", ()))
    if unused:  # transformers drops these silently: the model served would not be the one saved
        raise ModelStoreError(
            f"{path} has weights not used by its config ({', '.join(unused[:5])}"
            f"{f', ... {len(unused)} in all' if len(unused) > 5 else ''}): config.json does not describe "
            "these weights (a layer count or a size changed?)"
        )


def _load_novelty(
    path: Path, manifest: RewardManifest, model: Any, device: str | torch.device
) -> NoveltyStat | None:
    """The manifest's novelty statistic on `device`, checked against the width the heads read."""
    if manifest.novelty is None:
        return None
    hidden = manifest.novelty.hidden_size
    try:
        novelty = load_novelty(path, manifest.novelty).to(device)
    except ValueError as e:
        raise ModelStoreError(f"the novelty statistic does not load: {e}") from e
    width = _head_input_width(model)
    if width is not None and manifest.branches is not None:  # heads read the K branches' rows side by side
        width *= manifest.num_heads
    if width is not None and width != hidden:
        raise ModelStoreError(
            f"the novelty statistic is for features of size {hidden} but the heads read {width}"
        )
    return novelty


def _head_input_width(model: Any) -> int | None:
    """in_features of the K-way linear layer (the width of phi), for the architectures served."""
    for head in (getattr(model, "score", None), getattr(model, "classifier", None)):
        head = getattr(head, "out_proj", head)
        if isinstance(head, torch.nn.Linear):
            return int(head.in_features)
    return None


def check_finite_weights(model: Any, path: Path) -> None:
    """NaN or inf in a weight means a corrupted file (flipped bytes keep the safetensors header valid);
    served, it gives NaN rewards for every item, or worse, a constant one."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise ModelStoreError(
            f"{path}: weights contain NaN or inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): "
            "the checkpoint is corrupted"
        )


def check_vocabulary(model: Any, tokenizer: Any, path: Path) -> None:
    """Every id the tokenizer can produce must have an embedding row; otherwise the first item that
    uses one fails with `IndexError: index out of range in self` (on CUDA: a device-side assert that
    poisons the process). A tokenizer from another model, or an embedding cut short, shows here. An
    embedding larger than the vocabulary is normal (rows padded to a multiple of 64 or 128)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    size = len(tokenizer)
    if isinstance(rows, int) and size > rows:
        raise ModelStoreError(
            f"{path}: the tokenizer has {size} tokens (ids up to {size - 1}) but the model's input "
            f"embedding has {rows} rows: ids past it cannot be embedded (a tokenizer from another "
            "model, or an embedding cut short?)"
        )


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
