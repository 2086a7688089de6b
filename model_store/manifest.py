"""The `reward_heads.json` manifest: what turns a sequence-classification checkpoint into K heads.

The checkpoint itself stays a plain Hugging Face `AutoModelForSequenceClassification` directory
(its classification layer IS the K heads), so any public reward model loads as K=1 without a
manifest, and any hydra-rm model loads in plain transformers.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model_store.aggregation import Aggregation
from model_store.errors import ModelStoreError
from model_store.uncertainty import DisagreementQuantiles, NoveltyInfo

if TYPE_CHECKING:
    from model_store.novelty import NoveltyStat

MANIFEST_NAME = "reward_heads.json"
# 2: the optional `branches` block (per-head top layers). Manifests without it are still written as 1,
# so every model an older hydra-rm could serve keeps the file it had; a branched one says 2 and an
# older hydra-rm refuses it instead of serving every head from the first branch.
FORMAT_VERSION = 2
BRANCHES_FILE = "branches.safetensors"

Pooling = Literal["auto", "last_token", "first_token", "pooler"]
TruncationSide = Literal["left", "right", "reject"]


class HeadNormalization(BaseModel):
    """Per-head affine normalisation fitted at training time: r' = (r - mean) / std."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _positive_std(self) -> HeadNormalization:
        if len(self.mean) != len(self.std):
            raise ValueError("normalization.mean and normalization.std must have the same length")
        if any(not (s > 0) for s in self.std):
            raise ValueError("normalization.std must be strictly positive")
        return self


class BranchInfo(BaseModel):
    """Per-head branches (Hydra-style, issue 17): head j reads its own copy of the encoder's last
    `layers` layers and pooling tail (BERT pooler / decoder final norm). The checkpoint itself is
    branch 0, so plain transformers loads head 0 exactly; `branches.safetensors` holds branches
    1..K-1 as `{j}.layers.{i}.*` and `{j}.tail.*` (model_store/branches.py)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    layers: int = Field(ge=1, description="encoder layers each head owns (the model's last ones)")
    file: str = Field(default=BRANCHES_FILE, description="safetensors file with branches 1..K-1")

    @model_validator(mode="after")
    def _file(self) -> BranchInfo:
        if self.file != BRANCHES_FILE:
            raise ValueError(f"branches.file must be {BRANCHES_FILE!r}")
        return self


class RewardManifest(BaseModel):
    """Versioned description of the K heads; unknown keys are refused so typos fail loudly."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    format_version: int = 1
    num_heads: int = Field(ge=1)
    head_names: list[str]
    pooling: Pooling = "auto"
    normalization: HeadNormalization | None = None
    default_aggregation: str = "min"
    uwo_lambda: float = Field(default=1.0, ge=0.0)
    max_length: int = Field(default=512, ge=8)
    truncation_side: TruncationSide = "left"
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256 hex")
    description: str = ""
    # Written by `hydra-rm train` (training/): head std quantiles on the reference split, and where
    # the model came from (data sha256, base, arguments, seed, library versions, held-out metrics).
    disagreement: DisagreementQuantiles | None = None
    provenance: dict[str, Any] | None = None
    # Written by `hydra-rm train` / `hydra-rm calibrate`: the feature-space novelty statistic
    # (model_store/novelty.py) in `novelty.safetensors`, with its reference quantiles. Absent: no u.
    novelty: NoveltyInfo | None = None
    # Per-head top layers (format_version 2); absent: every head reads the one pooled state.
    branches: BranchInfo | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RewardManifest:
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"manifest format_version {self.format_version} is newer than this hydra-rm "
                f"understands ({FORMAT_VERSION}); upgrade hydra-rm"
            )
        if self.branches is not None:
            if self.format_version < 2:
                raise ValueError("a manifest with branches must say format_version 2")
            if self.num_heads < 2:
                raise ValueError("branches need at least 2 heads (one head has nothing to branch from)")
        if len(self.head_names) != self.num_heads:
            raise ValueError(f"head_names has {len(self.head_names)} names for num_heads={self.num_heads}")
        if len(set(self.head_names)) != len(self.head_names):
            raise ValueError("head_names must be unique")
        if self.normalization is not None and len(self.normalization.mean) != self.num_heads:
            raise ValueError("normalization must have one mean/std per head")
        Aggregation.parse(self.default_aggregation, self.num_heads).bind(self.novelty, self.disagreement)
        for rel, digest in self.files.items():
            check_relative_path(rel)
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"files[{rel!r}] must be a lowercase sha256 hex digest")
        return self

    @classmethod
    def default_for(cls, num_heads: int, **overrides: object) -> RewardManifest:
        names = [f"head_{i}" for i in range(num_heads)]
        return cls(num_heads=num_heads, head_names=names, **overrides)  # type: ignore[arg-type]

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        # Unset optional blocks stay out of the file, so models without them are written as before.
        unset = {k for k in ("novelty", "branches") if getattr(self, k) is None}
        path.write_text(self.model_dump_json(indent=2, exclude=unset or None) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> RewardManifest | None:
        path = Path(directory) / MANIFEST_NAME
        if not path.exists():
            return None
        return cls.model_validate(json.loads(path.read_text()))


def config_num_labels(directory: Path) -> int | None:
    """K as transformers reads a checkpoint's config.json: the length of `id2label`, else `num_labels`,
    else 2, transformers' default, which it does not write (a 2-label checkpoint's config.json may
    carry neither key). None when there is no config.json."""
    path = Path(directory) / "config.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    if config.get("id2label"):
        return len(config["id2label"])
    return int(config.get("num_labels") or 2)


def resolve_manifest(
    manifest: RewardManifest | None, num_labels: int | None, **defaults: Any
) -> RewardManifest:
    """The manifest a checkpoint is served with: its own `reward_heads.json` (which must agree with the
    checkpoint's K), else the default one for K heads. `models import` (ModelStore.publish, K from
    config.json) and `serve` (the loader, K from the loaded config) both resolve here, so a directory
    either serves and imports as the same K heads or is refused by both."""
    if manifest is None:
        return RewardManifest.default_for(num_labels or 1, **defaults)
    if num_labels is not None and manifest.num_heads != num_labels:
        raise ModelStoreError(
            f"manifest says {manifest.num_heads} heads but the checkpoint has num_labels={num_labels}"
        )
    return manifest


def resolve_aggregation(
    manifest: RewardManifest,
    aggregation: str | None = None,
    uwo_lambda: float | None = None,
    lcb_beta: float | None = None,
    stdp_beta: float | None = None,
) -> Aggregation:
    """The default aggregation of a served or scored model: what the operator set (a HYDRA_RM_* setting
    or a CLI option), else the manifest's. `serve`, `score` and `demo` all resolve through here."""
    lam = manifest.uwo_lambda if uwo_lambda is None else uwo_lambda
    beta = 1.0 if lcb_beta is None else lcb_beta
    sbeta = 1.0 if stdp_beta is None else stdp_beta
    agg = Aggregation.parse(aggregation or manifest.default_aggregation, manifest.num_heads, lam, beta, sbeta)
    return agg.bind(manifest.novelty, manifest.disagreement)


def check_relative_path(rel: str) -> str:
    """Manifest paths name files inside the model directory; anything that could leave it is refused."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or any(p in {"", ".", ".."} for p in parts):
        raise ValueError(f"manifest file path {rel!r} must be relative and stay inside the model directory")
    return rel


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checksum_tree(directory: Path) -> dict[str, str]:
    """sha256 of every file but the manifest: weights, config and tokenizer all change the rewards."""
    directory = Path(directory)
    out: dict[str, str] = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            out[p.relative_to(directory).as_posix()] = sha256_file(p)
    return out


def attach_novelty(directory: Path, stat: NoveltyStat, info: NoveltyInfo) -> None:
    """Write `novelty.safetensors` and the manifest entry into a model directory (not a store version:
    versions are immutable; `hydra-rm calibrate` writes into a copy and publishes that). Checksums the
    manifest already listed are recomputed so the directory still verifies."""
    from model_store.novelty import save_novelty  # torch: loaded only when a statistic is written

    directory = Path(directory)
    manifest = RewardManifest.read(directory)
    if manifest is None:
        raise ValueError(f"{directory} has no manifest to record the novelty statistic in")
    save_novelty(stat, directory)
    update: dict[str, object] = {"novelty": info}
    if manifest.files:
        update["files"] = checksum_tree(directory)
    manifest.model_copy(update=update).write(directory)
