"""What the sync and async clients share: items, request splitting, replica choice and retry policy.

Everything here is pure (no I/O), so both clients run the same decisions and the tests can check
them without a server.
"""

from __future__ import annotations

import email.utils
import json
import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from client.results import HydraHTTPError

# Statuses worth another try elsewhere or later: a load balancer with no live backend (502), overload
# or not ready (503), the server's own deadline (504). Every other 4xx/5xx is final: resending the
# same bad body cannot succeed, and a 500 is an item that breaks the model (the server isolates it).
RETRY_STATUSES = frozenset({502, 503, 504})
# The server's defaults (scoring/settings.py); used only when a server does not advertise its own.
DEFAULT_MAX_ITEMS = 1024
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
# Room left under the body limit for the envelope and for a server whose limit counts differently.
BODY_HEADROOM = 0.9


def normalize_item(item: Any, index: int) -> dict[str, Any]:
    """Accept the server's item forms, a (prompt, response) pair, or a bare string (raw text)."""
    if isinstance(item, str):
        return {"text": item}
    if isinstance(item, Mapping):
        return dict(item)
    if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return {"prompt": item[0], "response": item[1]}
    raise TypeError(
        f"items[{index}]: expected a dict ({{prompt, response}} | {{messages}} | {{text}}), "
        f"a (prompt, response) tuple or a string, got {type(item).__name__}"
    )


@dataclass(frozen=True)
class Limits:
    max_items: int = DEFAULT_MAX_ITEMS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def limits_from(card: Mapping[str, Any] | None, openapi: Mapping[str, Any] | None) -> Limits:
    """The server's limits: from its model card when it lists them, else from its OpenAPI schema,
    which states this server's real `maxItems` (service/app.py specialises it at startup)."""
    card = card or {}
    max_items = card.get("max_items_per_request")
    if not isinstance(max_items, int) and openapi:
        schemas = openapi.get("components", {}).get("schemas", {})
        max_items = schemas.get("ScoreRequest", {}).get("properties", {}).get("items", {}).get("maxItems")
    max_body = card.get("max_body_bytes")
    return Limits(
        max_items=max_items if isinstance(max_items, int) and max_items > 0 else DEFAULT_MAX_ITEMS,
        max_body_bytes=max_body if isinstance(max_body, int) and max_body > 0 else DEFAULT_MAX_BODY_BYTES,
    )


def encode_items(items: Iterable[Any]) -> list[bytes]:
    """Each item's JSON once: splitting measures these bytes and requests are joined from them."""
    return [
        json.dumps(normalize_item(it, i), ensure_ascii=False, allow_nan=False).encode()
        for i, it in enumerate(items)
    ]


def split(encoded: Sequence[bytes], limits: Limits, overhead: int = 256) -> list[range]:
    """Consecutive index ranges, each under the item and byte limits (an oversized single item is
    sent alone: the server's 413 then names it, rather than the client guessing)."""
    budget = int(limits.max_body_bytes * BODY_HEADROOM) - overhead
    chunks: list[range] = []
    start, size = 0, 0
    for i, e in enumerate(encoded):
        n = len(e) + 1
        if i > start and (i - start >= limits.max_items or size + n > budget):
            chunks.append(range(start, i))
            start, size = i, 0
        size += n
    if start < len(encoded):
        chunks.append(range(start, len(encoded)))
    return chunks


def score_body(encoded: Sequence[bytes], options: Mapping[str, Any]) -> bytes:
    head = json.dumps(dict(options))[:-1] if options else "{"
    sep = ", " if options else ""
    return f'{head}{sep}"items": ['.encode() + b", ".join(encoded) + b"]}"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retryable(error: BaseException) -> bool:
    return not isinstance(error, HydraHTTPError) or error.status in RETRY_STATUSES


@dataclass
class Backoff:
    """Exponential backoff with jitter: attempt n waits base * 2**(n-1), capped, times U(0.5, 1).

    "Equal jitter" keeps at least half the delay (so a dead server is not hammered) while spreading
    many workers' retries apart (AWS Architecture Blog, "Exponential Backoff And Jitter").
    """

    base: float = 0.25
    cap: float = 10.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        d = min(self.cap, self.base * (2 ** max(0, attempt - 1)))
        return d * self.rng.uniform(0.5, 1.0)


@dataclass
class Replica:
    url: str
    down_until: float = 0.0
    failures: int = 0  # consecutive


class ReplicaPool:
    """Round-robin over base URLs; a replica that fails is skipped until its cooldown ends, then
    tried again (its cooldown grows with consecutive failures, and is at least its Retry-After)."""

    def __init__(self, urls: Sequence[str], backoff: Backoff) -> None:
        if not urls:
            raise ValueError("give at least one server URL")
        self.replicas = [Replica(u.rstrip("/")) for u in urls]
        self.backoff = backoff
        self._next = 0
        self._lock = threading.Lock()  # the sync client calls from a thread pool

    def pick(self, now: float | None = None) -> tuple[Replica, float]:
        """The next live replica in turn (wait 0), or, if all are cooling down, the one free soonest
        and how long to wait for it."""
        now = time.monotonic() if now is None else now
        with self._lock:
            n = len(self.replicas)
            for k in range(n):
                r = self.replicas[(self._next + k) % n]
                if r.down_until <= now:
                    self._next = (self._next + k + 1) % n
                    return r, 0.0
            r = min(self.replicas, key=lambda x: x.down_until)
            return r, r.down_until - now

    def wait_time(self, now: float | None = None) -> float:
        """How long until some replica may be tried (0 if one is live); does not move the rotation."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return max(0.0, min(r.down_until for r in self.replicas) - now)

    def succeeded(self, replica: Replica) -> None:
        with self._lock:
            replica.failures = 0
            replica.down_until = 0.0

    def failed(self, replica: Replica, retry_after: float | None = None, now: float | None = None) -> float:
        """Take the replica out of rotation for a while; returns the cooldown."""
        now = time.monotonic() if now is None else now
        with self._lock:
            replica.failures += 1
            cooldown = self.backoff.delay(replica.failures)
            if retry_after is not None:
                cooldown = max(cooldown, retry_after)
            replica.down_until = max(replica.down_until, now + cooldown)
            return cooldown


def parse_urls(urls: str | Sequence[str]) -> list[str]:
    """`"http://a:8000,http://b:8000"` or a list; a trailing `/get_reward` or `/v1/score` is dropped
    so the same value works for OpenRLHF's flag and this client."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = []
    for u in items:
        u = u.strip().rstrip("/")
        for suffix in ("/get_reward", "/v1/score"):
            u = u.removesuffix(suffix)
        if u:
            out.append(u)
    if not out:
        raise ValueError(f"no server URL in {urls!r}")
    return out
