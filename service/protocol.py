"""Wire models of the HTTP API: requests, responses and the error body. Nothing else lives here.

Request models forbid unknown keys (a typo such as `agregation` must fail loudly, not silently score
with the default), except OpenRLHF's `/get_reward` body, whose senders add keys across versions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from model_store.tokenization import Item
from model_store.uncertainty import DisagreementQuantiles

# Placed by ScoreItem's pre-check where one half of prompt+response is missing, so the error names
# the missing field itself (`items[0].response`), not just the item.
_MISSING_HALF = object()


def _valid_unicode(value: str) -> str:
    # JSON can carry lone surrogates ("\ud800"); they are not text, and tokenizers choke on them.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"invalid Unicode (lone surrogate at position {e.start})") from e
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]


def _absent(description: str, **kwargs: Any) -> Any:
    """An optional field that may be left out but not sent as null (the schema says so too)."""

    def drop_default(schema: dict[str, Any]) -> None:
        schema.pop("default", None)

    return Field(default=None, description=description, json_schema_extra=drop_default, **kwargs)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Text = Field(min_length=1, max_length=64, description="`system`, `user`, `assistant`, ...")
    content: Text


# JSON Schema for "exactly one form": each branch requires its own keys and forbids the others'.
_FORM_KEYS = {"pair": ["prompt", "response"], "chat": ["messages"], "raw": ["text"]}
_ITEM_FORMS: dict[str, Any] = {
    "oneOf": [
        {
            "required": keys,
            "not": {
                "anyOf": [{"required": [k]} for other, ks in _FORM_KEYS.items() if other != form for k in ks]
            },
        }
        for form, keys in _FORM_KEYS.items()
    ]
}


class ScoreItem(BaseModel):
    """One thing to score: `prompt` + `response`, a chat `messages` list, or raw `text`.

    The only validator of items: HTTP bodies and JSONL lines both parse with it, then convert once,
    with `to_item`, to the engine's typed `Item`.
    """

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_ITEM_FORMS)

    prompt: Text = _absent("User prompt; needs `response`.")
    response: Text = _absent("Model response to the prompt.")
    messages: list[ChatMessage] = _absent(
        "A whole conversation, rendered with the model's chat template.", min_length=1
    )
    text: Text = _absent("Raw text, tokenized as is.")

    @model_validator(mode="before")
    @classmethod
    def _mark_missing_half(cls, data: Any) -> Any:
        if isinstance(data, dict) and "text" not in data and "messages" not in data:
            if ("prompt" in data) != ("response" in data):
                data = {**data, ("response" if "prompt" in data else "prompt"): _MISSING_HALF}
        return data

    @field_validator("prompt", "response", mode="before")
    @classmethod
    def _half_present(cls, value: Any, info: ValidationInfo) -> Any:
        if value is _MISSING_HALF:
            raise ValueError(f"prompt and response go together: `{info.field_name}` is missing")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> ScoreItem:
        forms = [self.text is not None, self.messages is not None]
        forms.append(self.prompt is not None or self.response is not None)
        if sum(forms) != 1:
            raise ValueError("give exactly one of: prompt+response, messages, or text")
        return self

    def to_item(self) -> Item:
        if self.messages is not None:
            return Item(messages=tuple({"role": m.role, "content": m.content} for m in self.messages))
        if self.text is not None:
            return Item(text=self.text)
        return Item(prompt=self.prompt, response=self.response)


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
        description="`min` (default: pessimistic), `mean`, `max`, `uwo` (mean - lambda * var) or "
        "`head:<i>`. Default: the server's.",
    )
    uwo_lambda: float | None = Field(
        default=None, ge=0.0, le=1e6, allow_inf_nan=False, description="Lambda for `uwo`."
    )
    return_heads: bool = Field(default=True, description="Include every head's reward per item.")


class ScoreResult(BaseModel):
    reward: float = Field(description="The aggregated reward.")
    heads: list[float] | None = Field(default=None, description="Every head's reward, in head order.")
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


class Usage(BaseModel):
    items: int
    tokens: int
    truncated: int


class ScoreResponse(BaseModel):
    model: str
    version: str
    aggregation: str
    uwo_lambda: float | None = Field(default=None, description="Lambda used, when aggregation is `uwo`.")
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
        "`reward_max`, one key per head name, and `std_percentile` (percentile of `reward_std` among "
        "the reference split's stds) only for models with stored quantiles."
    )


class ModelCard(BaseModel):
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
    disagreement: DisagreementQuantiles | None = Field(
        default=None,
        description="Quantiles of the head std on the reference split (what `std_percentile` is "
        "measured against); null for models without.",
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
