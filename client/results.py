"""Typed results, parsed from a copy of the server's response shape (service/protocol.py).

The client must install without the server (no pydantic models imported from `service`), so the
shape is restated here with plain dataclasses and checked field by field: a server that answers
something else raises `ProtocolError` instead of handing a trainer a wrong number.
`tests/client/test_results.py` holds these copies to the server's pydantic models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class HydraError(Exception):
    """Base of every error the client raises."""


class ProtocolError(HydraError):
    """The server answered 2xx with a body that is not the documented shape."""


class HydraHTTPError(HydraError):
    """The server answered an error status; `type`, `message` and `field` come from its error body."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        field: str | None = None,
        url: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        where = f" from {url}" if url else ""
        at = f" (field {field})" if field else ""
        super().__init__(f"HTTP {status} {type_}{where}: {message}{at}")
        self.status = status
        self.type = type_
        self.message = message
        self.field = field
        self.url = url
        self.retry_after = retry_after


class HydraUnavailable(HydraError):
    """No replica answered within the retry budget; `last_error` is what the last attempt got."""

    def __init__(self, message: str, last_error: BaseException | None) -> None:
        super().__init__(f"{message}; last error: {last_error!r}" if last_error else message)
        self.last_error = last_error


def _num(obj: Mapping[str, Any], key: str, where: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{where}.{key}: expected a number, got {value!r}")
    return float(value)


def _int(obj: Mapping[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{where}.{key}: expected an integer, got {value!r}")
    return value


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{where}.{key}: expected a string, got {value!r}")
    return value


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{where}: expected an object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Score:
    """One item's reward: the aggregation asked for, every head by name, and their spread."""

    reward: float
    heads: dict[str, float]  # head name -> reward; empty when return_heads=False
    min: float
    max: float
    mean: float
    std: float  # head disagreement: population std across heads
    tokens: int
    truncated: bool
    # Percentile (0-100) of `std` among the model's reference-split stds; None when the model has no
    # stored quantiles (or the server predates the field).
    std_percentile: float | None = None
    # Feature-space novelty of the item against the model's reference set, and its percentile there;
    # None for models without a novelty statistic.
    novelty: float | None = None
    novelty_percentile: float | None = None


class ScoreList(list):  # list[Score | None]
    """Results in input order, with what the server said about how they were computed.

    An entry is None only when the caller passed `on_error="none"`; `errors` then maps its index
    to the error that item's request ended with.
    """

    def __init__(
        self,
        scores: Sequence[Score | None] = (),
        *,
        model: str = "",
        version: str = "",
        aggregation: str = "",
        head_names: Sequence[str] = (),
        errors: Mapping[int, HydraError] | None = None,
    ) -> None:
        super().__init__(scores)
        self.model = model
        self.version = version
        self.aggregation = aggregation
        self.head_names = list(head_names)
        self.errors: dict[int, HydraError] = dict(errors or {})

    @property
    def rewards(self) -> list[float | None]:
        return [s.reward if s is not None else None for s in self]


@dataclass(frozen=True)
class ScoreResponse:
    """The body of `POST /v1/score` (ScoreResponse in service/protocol.py)."""

    model: str
    version: str
    aggregation: str
    uwo_lambda: float | None
    head_names: list[str]
    results: list[Score]
    lcb_beta: float | None = None
    usage: dict[str, int] = field(default_factory=dict)
    stdp_beta: float | None = None


def parse_score_response(body: Any, expected: int) -> ScoreResponse:
    obj = _obj(body, "response")
    names = obj.get("head_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProtocolError(f"response.head_names: expected a list of strings, got {names!r}")
    raw_results = obj.get("results")
    if not isinstance(raw_results, list) or len(raw_results) != expected:
        got = len(raw_results) if isinstance(raw_results, list) else raw_results
        raise ProtocolError(f"response.results: expected {expected} results, got {got!r}")
    results = [_parse_result(r, names, f"response.results[{i}]") for i, r in enumerate(raw_results)]
    lam, beta, sbeta = obj.get("uwo_lambda"), obj.get("lcb_beta"), obj.get("stdp_beta")
    usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
    return ScoreResponse(
        model=_str(obj, "model", "response"),
        version=_str(obj, "version", "response"),
        aggregation=_str(obj, "aggregation", "response"),
        uwo_lambda=float(lam) if isinstance(lam, (int, float)) and not isinstance(lam, bool) else None,
        lcb_beta=float(beta) if isinstance(beta, (int, float)) and not isinstance(beta, bool) else None,
        stdp_beta=float(sbeta) if isinstance(sbeta, (int, float)) and not isinstance(sbeta, bool) else None,
        head_names=list(names),
        results=results,
        usage={k: v for k, v in usage.items() if isinstance(v, int)},
    )


def _parse_result(raw: Any, names: list[str], where: str) -> Score:
    r = _obj(raw, where)
    heads_raw = r.get("heads")
    heads: dict[str, float] = {}
    if isinstance(heads_raw, Mapping):  # {head name: reward}; older servers sent a list in head order
        if list(heads_raw) != list(names):
            raise ProtocolError(f"{where}.heads: expected the heads {names}, got {list(heads_raw)!r}")
        heads_raw = list(heads_raw.values())
    if heads_raw is not None:
        if not isinstance(heads_raw, list) or len(heads_raw) != len(names):
            raise ProtocolError(f"{where}.heads: expected {len(names)} numbers, got {heads_raw!r}")
        for name, v in zip(names, heads_raw, strict=True):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ProtocolError(f"{where}.heads: expected numbers, got {v!r}")
            heads[name] = float(v)
    truncated = r.get("truncated")
    if not isinstance(truncated, bool):
        raise ProtocolError(f"{where}.truncated: expected a boolean, got {truncated!r}")
    score = Score(
        reward=_num(r, "reward", where),
        heads=heads,
        min=_num(r, "min", where),
        max=_num(r, "max", where),
        mean=_num(r, "mean", where),
        std=_num(r, "std", where),
        tokens=_int(r, "tokens", where),
        truncated=truncated,
        std_percentile=_num(r, "std_percentile", where) if r.get("std_percentile") is not None else None,
        novelty=_num(r, "novelty", where) if r.get("novelty") is not None else None,
        novelty_percentile=_num(r, "novelty_percentile", where)
        if r.get("novelty_percentile") is not None
        else None,
    )
    if not math.isfinite(score.reward):
        raise ProtocolError(f"{where}.reward: not a finite number ({score.reward})")
    return score


@dataclass(frozen=True)
class ModelInfo:
    """The served model, from `GET /v1/models` (ModelCard in service/protocol.py)."""

    id: str
    version: str
    num_heads: int
    head_names: list[str]
    default_aggregation: str
    uwo_lambda: float
    max_length: int
    token_budget: int
    max_batch_size: int
    raw: dict[str, Any] = field(default_factory=dict)  # every field, including ones newer than this client


def parse_models(body: Any) -> ModelInfo:
    obj = _obj(body, "models")
    data = obj.get("data")
    if not isinstance(data, list) or not data:
        raise ProtocolError(f"models.data: expected a non-empty list, got {data!r}")
    card = _obj(data[0], "models.data[0]")
    names = card.get("head_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProtocolError(f"models.data[0].head_names: expected a list of strings, got {names!r}")
    where = "models.data[0]"
    return ModelInfo(
        id=_str(card, "id", where),
        version=_str(card, "version", where),
        num_heads=_int(card, "num_heads", where),
        head_names=list(names),
        default_aggregation=_str(card, "default_aggregation", where),
        uwo_lambda=_num(card, "uwo_lambda", where),
        max_length=_int(card, "max_length", where),
        token_budget=_int(card, "token_budget", where),
        max_batch_size=_int(card, "max_batch_size", where),
        raw=dict(card),
    )


def parse_error(status: int, body: Any, url: str | None, retry_after: float | None) -> HydraHTTPError:
    """The server's error body is `{"error": {"type", "message", "field"}}`; anything else (a proxy's
    HTML page) still becomes an error with the status."""
    detail = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(detail, Mapping) and isinstance(detail.get("type"), str):
        field_ = detail.get("field") if isinstance(detail.get("field"), str) else None
        return HydraHTTPError(
            status, detail["type"], str(detail.get("message", "")), field_, url, retry_after
        )
    text = body if isinstance(body, str) else repr(body)
    return HydraHTTPError(status, "http_error", text[:300], None, url, retry_after)
