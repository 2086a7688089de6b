"""The item schema: the one validator of items, for HTTP bodies and JSONL lines alike.

Both parse with `ScoreItem`, then convert once, with `to_item`, to the engine's typed `Item`; a bad
item gets the same field and message either way (`validation_message`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

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


def field_path(loc: Sequence[Any], root: str = "body") -> str:
    """('body', 'items', 3, 'text') -> 'items[3].text'; the body itself is `root`."""
    parts = list(loc[1:] if loc and loc[0] in {"body", "query", "path", "header"} else loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out or root


def validation_message(errors: Sequence[dict[str, Any]], root: str = "body") -> tuple[str, str]:
    """(field, message) for pydantic errors: the first one, plus how many more. A JSONL line is
    validated as one item (`root="item"`), so it gets the field and message the same item gets over
    HTTP, without the `items[i].` prefix."""
    first = errors[0]
    loc = first.get("loc", ())
    if first.get("type") == "json_invalid":
        return "body", f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')}"
    field = field_path(loc, root)
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return field, f"{field}: {msg}{more}"
