"""`HydraClient` and `AsyncHydraClient`: score items against one or several hydra-rm replicas.

One source for both (sans-IO): `_Base` writes each flow (retry with Retry-After and failover, limit
discovery, bisection on 413 or a bad item) once, as a generator that yields `Send` / `Sleep` steps and
receives the response, or has the transport's exception thrown in. Each client only drives the steps:
`HydraClient._run` with httpx.Client and time.sleep, `AsyncHydraClient._run` with httpx.AsyncClient and
asyncio.sleep; they differ further only in how chunks run side by side (threads or tasks).
tests/client/test_twins.py holds the two to the same request sequence.

Scoring is a pure function of the item, so a request cut off mid-flight is safe to resend: a killed
replica costs a retry, never a lost or duplicated result (tests/client/test_failover.py kills one mid-run).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpx

from client._core import (
    Backoff,
    Limits,
    Replica,
    ReplicaPool,
    encode_items,
    limits_from,
    parse_retry_after,
    parse_urls,
    retryable,
    score_body,
    split,
)
from client.results import (
    HydraError,
    HydraHTTPError,
    HydraUnavailable,
    ModelInfo,
    ProtocolError,
    Score,
    ScoreList,
    ScoreResponse,
    parse_error,
    parse_models,
    parse_score_response,
)

log = logging.getLogger("hydra_rm.client")

OnError = Literal["raise", "none"]
# Transport failures worth a retry: the replica is down, restarting, or dropped the connection.
# (UnsupportedProtocol or LocalProtocolError are our own bugs; retrying them would only hide them.)
RETRY_EXCEPTIONS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
RetryHook = Callable[[str, BaseException, int, float], None]
T = TypeVar("T")
Parts = list[tuple[range, ScoreResponse | HydraError]]


@dataclass(frozen=True)
class Send:
    """A flow's step: send this request; the driver sends back the httpx response, or throws the
    transport's exception into the flow."""

    method: str
    url: str
    body: bytes | None = None


@dataclass(frozen=True)
class Sleep:
    """A flow's step: wait this long (every replica is cooling down); the driver sends back None."""

    seconds: float


Step = Send | Sleep
Flow = Generator[Step, Any, T]  # yields steps, receives replies, returns the flow's result


def _default_on_retry(url: str, error: BaseException, attempt: int, wait: float) -> None:
    log.warning("hydra-rm %s failed (attempt %d): %s; retrying in %.2fs", url, attempt, error, wait)


class _Base:
    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float = 180.0,
        connect_timeout: float = 5.0,
        retries: int = 8,
        backoff_base: float = 0.25,
        backoff_max: float = 10.0,
        max_items_per_request: int | None = None,
        max_body_bytes: int | None = None,
        concurrency: int = 4,
        max_connections: int = 64,
        on_retry: RetryHook | None = None,
        seed: int | None = None,
    ) -> None:
        """`timeout` is per request and defaults above the server's own 150 s deadline, so the server's
        504 (retried) normally comes first; `retries` counts attempts after the first, across replicas."""
        if retries < 0 or concurrency < 1:
            raise ValueError("retries must be >= 0 and concurrency >= 1")
        self.urls = parse_urls(urls)
        self.retries = retries
        self.concurrency = concurrency
        self.pool = ReplicaPool(self.urls, Backoff(backoff_base, backoff_max, random.Random(seed)))
        self._given_limits = (max_items_per_request, max_body_bytes)
        self._limits: Limits | None = None
        self._info: ModelInfo | None = None
        self.on_retry = on_retry or _default_on_retry
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._pool_limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )

    # -- shared decisions ---------------------------------------------------------------------------
    def _resolve_limits(self, card: dict[str, Any] | None, openapi: dict[str, Any] | None) -> Limits:
        found = limits_from(card, openapi)
        items, body = self._given_limits
        return Limits(items or found.max_items, body or found.max_body_bytes)

    def _needs_openapi(self, card: dict[str, Any]) -> bool:
        return self._given_limits[0] is None and not isinstance(card.get("max_items_per_request"), int)

    def _error_of(self, resp: httpx.Response, replica: Replica) -> HydraHTTPError:
        try:
            body: Any = resp.json()
        except ValueError:
            body = resp.text
        return parse_error(
            resp.status_code, body, replica.url, parse_retry_after(resp.headers.get("Retry-After"))
        )

    def _json(self, resp: httpx.Response, replica: Replica) -> Any:
        if resp.status_code >= 400:
            raise self._error_of(resp, replica)
        try:
            return resp.json()
        except ValueError as e:
            raise ProtocolError(
                f"{replica.url}: {resp.status_code} reply is not JSON: {resp.text[:200]!r}"
            ) from e

    def _after_failure(self, replica: Replica, error: BaseException, attempt: int) -> None:
        """Count a failed attempt: re-raise what is final, give up past the budget, else cool down."""
        if not retryable(error):
            raise error
        retry_after = error.retry_after if isinstance(error, HydraHTTPError) else None
        cooldown = self.pool.failed(replica, retry_after)
        if attempt > self.retries:
            raise HydraUnavailable(
                f"no hydra-rm replica answered after {attempt} attempts ({', '.join(self.urls)})", error
            ) from error
        wait = self.pool.wait_time()  # 0 when another replica is live (failover without waiting)
        self.on_retry(replica.url, error, attempt, min(wait, cooldown))

    @staticmethod
    def _options(
        aggregation: str | None,
        uwo_lambda: float | None,
        return_heads: bool,
        lcb_beta: float | None = None,
        stdp_beta: float | None = None,
    ) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if aggregation is not None:
            opts["aggregation"] = aggregation
        if uwo_lambda is not None:
            opts["uwo_lambda"] = uwo_lambda
        if lcb_beta is not None:
            opts["lcb_beta"] = lcb_beta
        if stdp_beta is not None:
            opts["stdp_beta"] = stdp_beta
        if not return_heads:
            opts["return_heads"] = False
        return opts

    @staticmethod
    def _should_split(error: HydraError, n: int) -> bool:
        """Too big for this server (body limit, or more items than it takes): halve and resend."""
        if n < 2 or not isinstance(error, HydraHTTPError):
            return False
        if error.status == 413:
            return True
        return error.status == 422 and error.field == "items" and "per request" in error.message

    @staticmethod
    def _isolatable(error: HydraError, n: int) -> bool:
        """With on_error="none", a bad item (422) or one that breaks the model (500) is found by
        bisection so its neighbours still get rewards."""
        return n > 1 and isinstance(error, HydraHTTPError) and error.status in (422, 500)

    @staticmethod
    def _assemble(n: int, parts: list[tuple[range, ScoreResponse | HydraError]]) -> ScoreList:
        scores: list[Score | None] = [None] * n
        errors: dict[int, HydraError] = {}
        meta: ScoreResponse | None = None
        for idx, part in parts:
            if isinstance(part, HydraError):
                errors.update({i: part for i in idx})
                continue
            meta = meta or part
            for i, s in zip(idx, part.results, strict=True):
                scores[i] = s
        return ScoreList(
            scores,
            model=meta.model if meta else "",
            version=meta.version if meta else "",
            aggregation=meta.aggregation if meta else "",
            head_names=meta.head_names if meta else (),
            errors=errors,
        )

    # -- the flows, written once (sans-IO): each yields Send/Sleep steps to its client's `_run` ------
    def _request_flow(self, method: str, path: str, body: bytes | None = None) -> Flow[Any]:
        """One call's JSON reply: next live replica, retry on a transport failure or a 502/503/504
        (waiting out Retry-After and cooldowns), give up past `retries`."""
        attempt = 0
        while True:
            replica, wait = self.pool.pick()
            if wait > 0:
                yield Sleep(wait)
            try:
                resp = yield Send(method, replica.url + path, body)
                data = self._json(resp, replica)
            except (HydraHTTPError, *RETRY_EXCEPTIONS) as e:
                attempt += 1
                self._after_failure(replica, e, attempt)
                continue
            self.pool.succeeded(replica)
            return data

    def _model_info_flow(self) -> Flow[ModelInfo]:
        if self._info is None:
            self._info = parse_models((yield from self._request_flow("GET", "/v1/models")))
        return self._info

    def _limits_flow(self) -> Flow[Limits]:
        """Run under the client's lock, so concurrent first calls ask the server once."""
        if self._limits is None:
            card = (yield from self._model_info_flow()).raw
            openapi = None
            if self._needs_openapi(card):
                try:
                    openapi = yield from self._request_flow("GET", "/openapi.json")
                except HydraHTTPError:  # schema not served: fall back to the defaults (and 413 splits)
                    openapi = None
            self._limits = self._resolve_limits(card, openapi)
        return self._limits

    def _range_flow(
        self, encoded: list[bytes], idx: range, opts: dict[str, Any], on_error: OnError
    ) -> Flow[Parts]:
        """Score `encoded[idx]` in one request; halve and resend when it is too big (or, with
        on_error="none", to corner a bad item)."""
        try:
            body = score_body([encoded[i] for i in idx], opts)
            data = yield from self._request_flow("POST", "/v1/score", body)
            return [(idx, parse_score_response(data, len(idx)))]
        except HydraError as e:
            if self._should_split(e, len(idx)) or (on_error == "none" and self._isolatable(e, len(idx))):
                mid = idx.start + len(idx) // 2
                lo = yield from self._range_flow(encoded, range(idx.start, mid), opts, on_error)
                hi = yield from self._range_flow(encoded, range(mid, idx.stop), opts, on_error)
                return lo + hi
            if on_error == "none":
                return [(idx, e)]
            raise

    def _chunk_flows(
        self, encoded: list[bytes], limits: Limits, opts: dict[str, Any], on_error: OnError
    ) -> list[Flow[Parts]]:
        """One flow per request-sized chunk; the clients run them `concurrency` at a time."""
        return [self._range_flow(encoded, idx, opts, on_error) for idx in split(encoded, limits)]


class HydraClient(_Base):
    """Blocking client; thread-safe. Large inputs go out as several requests, `concurrency` at a time."""

    def __init__(self, urls: str | Sequence[str], **kwargs: Any) -> None:
        transport = kwargs.pop("transport", None)
        super().__init__(urls, **kwargs)
        self._http = httpx.Client(
            timeout=self._timeout, limits=self._pool_limits, headers=self._headers, transport=transport
        )
        self._lock = threading.Lock()

    def __enter__(self) -> HydraClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, flow: Flow[T]) -> T:
        """Drive a flow with blocking I/O."""
        reply: Any = None
        error: Exception | None = None
        while True:
            try:
                step = flow.send(reply) if error is None else flow.throw(error)
            except StopIteration as done:
                return done.value
            reply, error = None, None
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                continue
            try:
                reply = self._http.request(step.method, step.url, content=step.body)
            except Exception as e:  # the flow decides: retry, or let it rise
                error = e

    def model_info(self) -> ModelInfo:
        """The served model (`GET /v1/models`), fetched once."""
        return self._run(self._model_info_flow())

    def limits(self) -> Limits:
        """How large one request may be: given, advertised by the server, or the server's defaults."""
        with self._lock:
            return self._run(self._limits_flow())

    def score(
        self,
        items: Iterable[Any],
        *,
        aggregation: str | None = None,
        uwo_lambda: float | None = None,
        return_heads: bool = True,
        on_error: OnError = "raise",
        lcb_beta: float | None = None,
        stdp_beta: float | None = None,
    ) -> ScoreList:
        """Score items (dicts in the server's forms, (prompt, response) pairs, or strings = raw text);
        results in input order. Raises on the first request that fails for good, unless
        `on_error="none"`: then failed items are None and `result.errors[i]` says why."""
        encoded = encode_items(items)
        if not encoded:
            return ScoreList()
        opts = self._options(aggregation, uwo_lambda, return_heads, lcb_beta, stdp_beta)
        flows = self._chunk_flows(encoded, self.limits(), opts, on_error)
        if len(flows) == 1 or self.concurrency == 1:
            parts = [p for f in flows for p in self._run(f)]
        else:
            with ThreadPoolExecutor(min(self.concurrency, len(flows))) as ex:
                parts = [p for ps in ex.map(self._run, flows) for p in ps]  # map keeps input order
        return self._assemble(len(encoded), parts)

    def score_texts(self, texts: Iterable[str], **kwargs: Any) -> ScoreList:
        """Raw texts, tokenized as they are (e.g. a prompt and response already joined by a template)."""
        return self.score([{"text": t} for t in texts], **kwargs)


class AsyncHydraClient(_Base):
    """asyncio client. Create it on the loop that will use it (httpx binds connections to a loop)."""

    def __init__(self, urls: str | Sequence[str], **kwargs: Any) -> None:
        transport = kwargs.pop("transport", None)
        super().__init__(urls, **kwargs)
        self._http = httpx.AsyncClient(
            timeout=self._timeout, limits=self._pool_limits, headers=self._headers, transport=transport
        )
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> AsyncHydraClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _run(self, flow: Flow[T]) -> T:
        """Drive a flow on the caller's loop (as `HydraClient._run`, awaiting instead of blocking)."""
        reply: Any = None
        error: Exception | None = None
        while True:
            try:
                step = flow.send(reply) if error is None else flow.throw(error)
            except StopIteration as done:
                return done.value
            reply, error = None, None
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                continue
            try:
                reply = await self._http.request(step.method, step.url, content=step.body)
            except Exception as e:  # the flow decides: retry, or let it rise
                error = e

    async def model_info(self) -> ModelInfo:
        return await self._run(self._model_info_flow())

    async def limits(self) -> Limits:
        async with self._lock:
            return await self._run(self._limits_flow())

    async def score(
        self,
        items: Iterable[Any],
        *,
        aggregation: str | None = None,
        uwo_lambda: float | None = None,
        return_heads: bool = True,
        on_error: OnError = "raise",
        lcb_beta: float | None = None,
        stdp_beta: float | None = None,
    ) -> ScoreList:
        """As `HydraClient.score`; requests run `concurrency` at a time on the caller's loop."""
        encoded = encode_items(items)
        if not encoded:
            return ScoreList()
        opts = self._options(aggregation, uwo_lambda, return_heads, lcb_beta, stdp_beta)
        flows = self._chunk_flows(encoded, await self.limits(), opts, on_error)
        gate = asyncio.Semaphore(self.concurrency)

        async def run(flow: Flow[Parts]) -> Parts:
            async with gate:
                return await self._run(flow)

        tasks = [asyncio.ensure_future(run(f)) for f in flows]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for t in tasks:  # one chunk failed for good: stop the others instead of leaking them
                t.cancel()
        return self._assemble(len(encoded), [p for ps in results for p in ps])

    async def score_texts(self, texts: Iterable[str], **kwargs: Any) -> ScoreList:
        return await self.score([{"text": t} for t in texts], **kwargs)
