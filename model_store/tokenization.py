"""How an item becomes token ids: the one policy serving, batch jobs and training all share.

An `Item` is already valid when it gets here (the service validates untrusted input with the
pydantic models of `service/protocol.py`, once, at the edge); this module only decides how a valid
item is rendered and cut:

- the tokenizer's chat template where the model has one (prompt+response become a user/assistant
  exchange), the tokenizer's own pair template otherwise (`[CLS] p [SEP] r [SEP]` for BERT-likes);
- truncation per the manifest (`left` keeps the leading special tokens and the end, so the response
  end is never cut silently; `right` keeps the start and the trailing specials; `reject` refuses);
- huge strings are pre-cut by characters before tokenizing, keeping far more than truncation keeps.

Training imports this (not `service`) so a preference pair is tokenized exactly as it is scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

# Characters kept per token of max_length when pre-cutting huge strings: real tokens average 3-5
# characters, and byte-level BPE merges rarely exceed ~30, so 64 keeps every token that could survive.
PRECUT_CHARS_PER_TOKEN = 64

TruncationSide = Literal["left", "right", "reject"]
Form = Literal["pair", "chat", "text"]


class ItemError(ValueError):
    """A valid item the model cannot score as given (over-long under `reject`, untokenizable, a
    conversation the chat template refuses); `field` names the item's field for a 4xx."""

    def __init__(self, message: str, field: str = "item") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Item:
    """One thing to score, in exactly one form: `prompt`+`response`, chat `messages`, or raw `text`.

    Built by trusted code (or by `scoring.items.ScoreItem.to_item()` after validation); it is not
    re-validated here. `messages` holds mappings with string `role` and `content`.
    """

    prompt: str | None = None
    response: str | None = None
    messages: Sequence[Mapping[str, str]] | None = None
    text: str | None = None

    @property
    def form(self) -> Form:
        if self.text is not None:
            return "text"
        if self.messages is not None:
            return "chat"
        return "pair"

    @property
    def main_field(self) -> str:
        """The field an error about the whole item's content points at (the response end for pairs)."""
        return {"text": "text", "chat": "messages", "pair": "response"}[self.form]


@dataclass
class EncodedItem:
    """Token ids ready for the encoder; `original_tokens` is the length before truncation."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: bool
    original_tokens: int

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


class ItemTokenizer:
    """Tokenize items under one model's policy: `ItemTokenizer(tokenizer, manifest).encode(item)`.

    `max_length`/`truncation_side` override the manifest's (HYDRA_RM_MAX_LENGTH, ...); `max_length` is
    further capped by `model_max_length` (the encoder's position limit) when given.
    """

    def __init__(
        self,
        tokenizer: Any,
        manifest: Any,
        *,
        max_length: int | None = None,
        truncation_side: TruncationSide | str | None = None,
        model_max_length: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = min(max_length or manifest.max_length, model_max_length or 10**9)
        self.truncation_side = truncation_side or manifest.truncation_side
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._special_ids = set(tokenizer.all_special_ids)
        # What a batch is padded with (positions are masked out, so any id works where there is none).
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @property
    def precut_chars(self) -> int:
        """Characters of one string (or one conversation) that can matter; beyond it is cut unseen."""
        return self.max_length * PRECUT_CHARS_PER_TOKEN

    def chars(self, item: Item) -> int:
        """Characters the tokenizer will actually see for `item` (after the pre-cut): its cost."""
        limit = self.precut_chars
        if item.messages is not None:
            content = sum(len(m["content"]) for m in item.messages)
            roles = sum(len(m["role"]) + 8 for m in item.messages)  # + the template's markup, roughly
            return min(content, limit) + roles
        return sum(min(len(t), limit) for t in (item.text, item.prompt, item.response) if t is not None)

    # -- the policy ------------------------------------------------------------------------------
    def encode(self, item: Item) -> EncodedItem:
        """Tokenize with the chat template where there is one, then apply the truncation policy."""
        ids, types = self._tokenize_or_item_error(item, precut=True)
        n = len(ids)
        if self.truncation_side == "reject":
            cut = self._is_cut(item)
            if n <= self.max_length and cut:  # the pre-cut part fits (over 64 chars/token): count it all
                ids, types = self._tokenize_or_item_error(item, precut=False)
                n, cut = len(ids), False
            if n > self.max_length:
                where = f" in its first {self.precut_chars} characters" if cut else ""
                raise ItemError(
                    f"item has {n} tokens{where}, over max_length={self.max_length} "
                    "(truncation is set to reject)",
                    field=item.main_field,
                )
            return EncodedItem(ids, types, False, n)
        if n <= self.max_length:
            return EncodedItem(ids, types, self._is_cut(item), n)
        keep = self._truncate_slices(ids, n)
        ids = [t for s in keep for t in ids[s]]
        types = [t for s in keep for t in types[s]] if types is not None else None
        return EncodedItem(ids, types, True, n)

    def _tokenize_or_item_error(self, item: Item, precut: bool) -> tuple[list[int], list[int] | None]:
        try:
            return self.tokenize(item, precut=precut)
        except ItemError:
            raise
        except Exception as e:  # e.g. lone surrogates the tokenizer cannot encode: the item's fault
            raise ItemError(f"could not tokenize the item: {e}", field=item.main_field) from e

    def tokenize(self, item: Item, *, precut: bool = True) -> tuple[list[int], list[int] | None]:
        """Token ids (and token types, for pair-encoding tokenizers) before truncation; `precut`
        first drops what truncation would drop anyway (see `_precut`)."""
        tok = self.tokenizer
        cut = self._precut if precut else (lambda text: text)
        if item.text is not None:
            enc = tok(cut(item.text), add_special_tokens=True)
        elif item.messages is not None:
            messages = self._precut_messages(item.messages, precut)
            if self.has_chat_template:
                enc = tok(self._render(messages, "messages"), add_special_tokens=False)
            else:  # documented fallback: "role: content" lines as plain text
                lines = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
                enc = tok(lines, add_special_tokens=True)
        else:
            assert item.prompt is not None and item.response is not None, "a pair needs both halves"
            prompt, response = cut(item.prompt), cut(item.response)
            if self.has_chat_template:
                chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                enc = tok(self._render(chat, "prompt"), add_special_tokens=False)
            else:  # the tokenizer's own pair template (e.g. [CLS] p [SEP] r [SEP] for BERT-likes)
                enc = tok(prompt, response, add_special_tokens=True)
        ids = list(enc["input_ids"])
        types = list(enc["token_type_ids"]) if "token_type_ids" in enc else None
        if not ids:
            raise ItemError("item tokenizes to zero tokens", field=item.main_field)
        return ids, types

    def _truncate_slices(self, ids: list[int], n: int) -> list[slice]:
        """Left (default): keep leading special tokens (BOS/CLS) and the end, so the response end survives.

        Right: keep the start and the trailing special tokens (EOS/SEP), for models trained that way.
        """
        limit = self.max_length
        if self.truncation_side == "left":
            lead = 0
            while lead < n and ids[lead] in self._special_ids and lead < limit // 2:
                lead += 1
            return [slice(0, lead), slice(n - (limit - lead), n)]
        trail = 0
        while trail < n and ids[n - 1 - trail] in self._special_ids and trail < limit // 2:
            trail += 1
        return [slice(0, limit - trail), slice(n - trail, n)]

    def _precut(self, text: str) -> str:
        """Drop what truncation would drop anyway before tokenizing a huge string (a 14 MB query took
        8.5 s to tokenize into 7.6M tokens to keep 512). The cut keeps far more characters than
        max_length tokens can span, so it does not change which tokens survive; `original_tokens`
        then counts the pre-cut text. Under `reject` the start is kept: enough to count past max_length."""
        limit = self.precut_chars
        if len(text) <= limit:
            return text
        return text[-limit:] if self.truncation_side == "left" else text[:limit]

    def _precut_messages(
        self, messages: Sequence[Mapping[str, str]], precut: bool = True
    ) -> list[dict[str, str]]:
        """The pre-cut of a conversation: its contents together keep `precut_chars` characters from
        the end (left truncation) or the start (right), so what truncation keeps is unchanged. Every
        message stays (with empty content if cut away): the template's leading tokens, which left
        truncation keeps, and its role-order checks see the same conversation."""
        out = [{"role": m["role"], "content": m["content"]} for m in messages]
        budget = self.precut_chars
        if not precut or sum(len(m["content"]) for m in out) <= budget:
            return out
        order = reversed(out) if self.truncation_side == "left" else iter(out)
        for m in order:
            content = m["content"]
            if len(content) > budget:
                m["content"] = (
                    (content[len(content) - budget :]) if self.truncation_side == "left" else content[:budget]
                )
            budget -= len(m["content"])
        return out

    def _is_cut(self, item: Item) -> bool:
        """Whether the pre-cut drops anything from `item` (then it is truncated, or under `reject` over-long)."""
        limit = self.precut_chars
        if item.messages is not None:
            return sum(len(m["content"]) for m in item.messages) > limit
        return any(t is not None and len(t) > limit for t in (item.text, item.prompt, item.response))

    def _render(self, messages: list[dict[str, str]], field: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as e:  # template-level constraints (role order, unknown roles)
            raise ItemError(f"chat template rejected the conversation: {e}", field=field) from e
