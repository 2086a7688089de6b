"""Wire models of the HTTP API: requests, responses and the error body. Nothing else lives here.

Request models forbid unknown keys (a typo such as `agregation` must fail loudly, not silently score
with the default), except OpenRLHF's `/get_reward` body, whose senders add keys across versions.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    model_serializer,
)

from model_store.uncertainty import DisagreementQuantiles, NoveltyInfo
from scoring.items import ScoreItem, Text


class _OmitWhenNone(BaseModel):
    """Leaves the fields in `_omit_when_none` out of the JSON while they are None: what models without
    a novelty statistic answer stays byte for byte what it was before the statistic existed."""

    _omit_when_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for key in self._omit_when_none:
                if key in data and data[key] is None:
                    del data[key]
        return data


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    items: list[ScoreItem] = Field(min_length=1, description="Items to score (at most the server's limit).")
    model: str | None = Field(
        default=None,
        max_length=256,
        description="Which served model scores them (`/v1/models` lists them). Default: the first.",
    )
    aggregation: str | None = Field(
        default=None,
        max_length=16,
        description="`min` (default: pessimistic), `mean`, `max`, `uwo` (mean - lambda * var), `lcb` "
        "(novelty pessimism), `stdp` (disagreement pessimism in reference units) or `head:<i>`. Default: "
        "the server's.",
    )
    uwo_lambda: float | None = Field(
        default=None, ge=0.0, le=1e6, allow_inf_nan=False, description="Lambda for `uwo`."
    )
    lcb_beta: float | None = Field(
        default=None,
        ge=0.0,
        le=1e6,
        allow_inf_nan=False,
        description="Beta for `lcb`: mean - beta * reward_std * novelty / (reference median novelty).",
    )
    stdp_beta: float | None = Field(
        default=None,
        ge=0.0,
        le=1e6,
        allow_inf_nan=False,
        description="Beta for `stdp`: mean - beta * reward_std * head std / (reference median head std).",
    )
    return_heads: bool = Field(default=True, description="Include every head's reward per item.")


class ScoreResult(_OmitWhenNone):
    _omit_when_none = ("novelty", "novelty_percentile")

    reward: float = Field(description="The aggregated reward.")
    heads: dict[str, float] | None = Field(
        default=None, description="Every head's reward by head name (as the JSONL job writes them)."
    )
    min: float
    max: float
    mean: float
    std: float = Field(description="Head disagreement: population std across heads.")
    tokens: int = Field(description="Tokens scored (after truncation).")
    truncated: bool
    std_percentile: float | None = Field(
        default=None,
        description="Percentile (0-100) of `std` among the model's reference-split stds, stored at "
        "training time; above 95 means more disagreement than 95% of what the model was fitted on. "
        "Null for models without stored quantiles.",
    )
    novelty: float | None = Field(
        default=None,
        description="Feature-space novelty u = sqrt(phi^T (Phi^T Phi + lambda I)^-1 phi) of the pooled "
        "state the heads read, against the model's reference set. Only for models with a novelty "
        "statistic (`hydra-rm calibrate`); absent otherwise.",
    )
    novelty_percentile: float | None = Field(
        default=None,
        description="Percentile (0-100) of `novelty` among the reference split's; above 95 means more "
        "novel than 95% of the reference. Absent for models without the statistic.",
    )


class Usage(BaseModel):
    items: int
    tokens: int
    truncated: int


class ScoreResponse(_OmitWhenNone):
    _omit_when_none = ("lcb_beta", "stdp_beta")

    model: str
    version: str
    aggregation: str
    uwo_lambda: float | None = Field(default=None, description="Lambda used, when aggregation is `uwo`.")
    lcb_beta: float | None = Field(default=None, description="Beta used, when aggregation is `lcb`.")
    stdp_beta: float | None = Field(default=None, description="Beta used, when aggregation is `stdp`.")
    head_names: list[str]
    results: list[ScoreResult]
    usage: Usage


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward model body; `query` holds full prompt+response texts."""

    model_config = ConfigDict(extra="allow", strict=True)

    query: list[Text] = Field(description="Full prompt+response texts, scored as raw text.")
    prompts: list[Any] | None = Field(default=None, description="Accepted and ignored.")
    labels: list[Any] | None = Field(default=None, description="Accepted and ignored (often null).")


class GetRewardResponse(BaseModel):
    rewards: list[float] = Field(description="One reward per query, in input order.")
    scores: list[float] = Field(description="Same as `rewards` (OpenRLHF reads either).")
    extra_logs: dict[str, list[float]] = Field(
        description="Per-query values OpenRLHF logs: `reward_std`, `reward_min`, `reward_mean`, "
        "`reward_max`, one key per head name, `std_percentile` (percentile of `reward_std` among "
        "the reference split's stds) only for models with stored quantiles, and `novelty` and "
        "`novelty_percentile` only for models with a novelty statistic."
    )


class ModelCard(_OmitWhenNone):
    _omit_when_none = ("novelty", "novelty_unavailable", "branch_layers")

    id: str
    object: Literal["model"] = "model"
    version: str
    num_heads: int
    head_names: list[str]
    encoder: str | None
    architecture: str | None
    pooling: str
    max_length: int
    truncation_side: str
    default_aggregation: str
    uwo_lambda: float
    chat_template: bool
    device: str
    token_budget: int
    max_batch_size: int
    max_items_per_request: int = Field(description="Most items one request may carry (422 beyond).")
    max_body_bytes: int = Field(description="Largest request body accepted, in bytes (413 beyond).")
    disagreement: DisagreementQuantiles | None = Field(
        default=None,
        description="Quantiles of the head std on the reference split (what `std_percentile` is "
        "measured against); null for models without.",
    )
    novelty: NoveltyInfo | None = Field(
        default=None,
        description="The novelty statistic: lambda, rank, reference quantiles of u and the reward scale "
        "`lcb` uses. Absent for models without.",
    )
    novelty_unavailable: str | None = Field(
        default=None,
        description="Why this model's novelty statistic is not served by this engine (the vLLM engine "
        "gets no pooled hidden state): responses carry no `novelty` and `lcb` is refused. Absent otherwise.",
    )
    branch_layers: int | None = Field(
        default=None,
        description="Layers each head owns (per-head branches; README 'What a reward model is on disk'). "
        "Absent for models whose heads share every layer.",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "draining", "loading", "broken"]
    model: str | None = None


class ErrorDetail(BaseModel):
    type: str = Field(description="Stable machine-readable kind, e.g. `invalid_request`, `overloaded`.")
    message: str
    field: str | None = Field(default=None, description="The offending field, e.g. `items[3].text`.")


class ErrorResponse(BaseModel):
    error: ErrorDetail
