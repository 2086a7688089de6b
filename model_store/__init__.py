"""What a reward model is on disk (checkpoint + `reward_heads.json`), and a versioned store of them."""

from model_store.errors import ChecksumMismatch, InvalidModelName, ModelNotFound, ModelStoreError, UnsafeModel
from model_store.manifest import MANIFEST_NAME, RewardManifest
from model_store.store import ModelRef, ModelStore

__all__ = [
    "MANIFEST_NAME",
    "ChecksumMismatch",
    "InvalidModelName",
    "ModelNotFound",
    "ModelRef",
    "ModelStore",
    "ModelStoreError",
    "RewardManifest",
    "UnsafeModel",
]
