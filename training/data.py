"""Preference pairs from JSONL: `{"prompt", "chosen", "rejected"}` strings or chat-message lists.

Each side becomes an engine item (prompt+response, messages, or text) so that training tokenizes
each response exactly as the service will score it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_store.tokenization import Item


class DataError(ValueError):
    """A line of the preference file that cannot be used; the message names the line and field."""


# Above this share of pairs with chosen == rejected, `train` warns: they add nothing but ln 2 to the loss.
IDENTICAL_WARN_SHARE = 0.05


@dataclass(frozen=True)
class Pair:
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    where: str = field(default="", compare=False)  # "path:line", for messages about the pair


def response_items(pairs: Sequence[Pair]) -> list[Item]:
    """Both responses of every pair, pair by pair: the reference rows of the novelty statistic (what
    `hydra-rm train`, the default's build and `calibrate` on a pairs file all fit it on)."""
    return [Item(**it) for p in pairs for it in (p.chosen, p.rejected)]


def _is_messages(x: Any) -> bool:
    """A non-empty list of {role, content} string pairs (the tokenizer trusts items it is given)."""
    return (
        isinstance(x, list)
        and bool(x)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in x)
    )  # fmt: skip


def to_item(prompt: Any, response: Any, where: str) -> dict[str, Any]:
    """One side of a pair as an engine item; chat lists get the prompt prepended as messages."""
    if isinstance(response, str):
        if prompt is None:
            return {"text": response}
        if isinstance(prompt, str):
            return {"prompt": prompt, "response": response}
        if _is_messages(prompt):
            return {"messages": [*prompt, {"role": "assistant", "content": response}]}
    elif _is_messages(response):
        if prompt is None:
            return {"messages": list(response)}
        if isinstance(prompt, str):
            return {"messages": [{"role": "user", "content": prompt}, *response]}
        if _is_messages(prompt):
            return {"messages": [*prompt, *response]}
    raise DataError(
        f"{where}: prompt must be a string, a message list or absent, and chosen/rejected strings or "
        "message lists"
    )


def parse_pair(obj: Any, where: str) -> Pair:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: each line must be a JSON object with chosen and rejected")
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise DataError(f"{where}: missing field {key!r}")
    prompt = obj.get("prompt")
    return Pair(to_item(prompt, obj["chosen"], where), to_item(prompt, obj["rejected"], where), where)


def load_pairs(path: Path) -> list[Pair]:
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            pairs.append(parse_pair(obj, f"{path}:{lineno}"))
    if not pairs:
        raise DataError(f"{path} has no preference pairs")
    return pairs


def check_signal(pairs: list[Pair], path: Path) -> str | None:
    """Pairs whose chosen and rejected items are identical teach nothing (their loss is ln 2 whatever
    the model does). DataError, naming the lines, when every pair is such; a warning (returned) when
    more than IDENTICAL_WARN_SHARE of them are."""
    same = [p.where.rpartition(":")[2] for p in pairs if p.chosen == p.rejected]
    if not same:
        return None
    lines = f"line{'s' if len(same) > 1 else ''} {', '.join(same[:10])}{', ...' if len(same) > 10 else ''}"
    if len(same) == len(pairs):
        raise DataError(
            f"{path}: all {len(pairs)} pairs have chosen == rejected ({lines}): there is no preference "
            "to learn; check the columns the file was built from"
        )
    if len(same) > IDENTICAL_WARN_SHARE * len(pairs):
        return (
            f"{path}: {len(same)} of {len(pairs)} pairs have chosen == rejected ({lines}); they carry no "
            "preference signal and only dilute the rest"
        )
    return None


def write_pairs(path: Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
