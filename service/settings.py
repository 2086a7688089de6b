"""All configuration in one place: environment variables with prefix `HYDRA_RM_` (README lists each)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_store_root() -> Path:
    return Path("~/.cache/hydra-rm/models").expanduser()


class Settings(BaseSettings):
    """Every field is documented because the README table is generated from these descriptions."""

    model_config = SettingsConfigDict(env_prefix="HYDRA_RM_", extra="ignore")

    # -- model -------------------------------------------------------------------------------------
    model: str | None = Field(
        default=None,
        description="Model to serve: store name (`name` or `name:version`), local directory, or hub id "
        "(`org/name`). Empty: the embedded default model.",
    )
    store_root: Path = Field(
        default_factory=default_store_root, description="Root directory of the model store."
    )
    allow_pickle: bool = Field(
        default=False, description="Allow pickled (.bin) weights. Only for trusted models."
    )
    trust_remote_code: bool = Field(default=False, description="Allow a model's custom Python code to run.")
    device: str = Field(
        default="auto", description="`auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:N`."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Encoder dtype; `auto` is bfloat16 on CUDA and float32 on CPU."
    )
    max_length: int | None = Field(
        default=None, ge=8, description="Max tokens per item (default: the manifest's)."
    )
    truncation_side: Literal["left", "right", "reject"] | None = Field(
        default=None,
        description="Over-long items: `left` cuts the prompt start and keeps the response end, `right` cuts "
        "the end, `reject` answers 422. Default: the manifest's (usually `left`).",
    )
    padding_side: Literal["right", "left"] = Field(
        default="right", description="Padding side for decoder models (encoders are always right-padded)."
    )

    # -- batching ----------------------------------------------------------------------------------
    token_budget: int | None = Field(
        default=None,
        ge=64,
        description="Max padded tokens per encoder batch. Default 4096 on CPU (measured: larger loses), "
        "65536 on CUDA.",
    )
    max_batch_size: int = Field(default=64, ge=1, description="Max items per encoder batch.")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.model == "":
            self.model = None
        return self

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self):  # noqa: ANN201 - torch.dtype, imported lazily
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)

    def resolved_token_budget(self) -> int:
        if self.token_budget is not None:
            return self.token_budget
        return 65536 if self.resolved_device().startswith("cuda") else 4096


def build_engine(settings: Settings):  # noqa: ANN201 - returns service.engine.ScoringEngine
    """Load the configured model into an engine (shared by `serve` and `score`)."""
    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from service.engine import ScoringEngine

    rm = load_reward_model(
        settings.model,
        ModelStore(settings.store_root),
        allow_pickle=settings.allow_pickle,
        trust_remote_code=settings.trust_remote_code,
        device=settings.resolved_device(),
        dtype=settings.resolved_dtype(),
    )
    return ScoringEngine(
        rm,
        token_budget=settings.resolved_token_budget(),
        max_batch_size=settings.max_batch_size,
        padding_side=settings.padding_side,
        max_length=settings.max_length,
        truncation_side=settings.truncation_side,
    )
