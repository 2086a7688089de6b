"""What the routes share: the engine, the batcher, the metrics and the request-level policy
(aggregation defaults, limits, deadlines, client disconnects). One instance per app, built in the
lifespan once the model is loaded."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.requests import Request
from starlette.types import Receive

from model_store.manifest import validate_aggregation
from service.batcher import Batcher
from service.engine import EncodedItem, ItemError, ItemScore, ScoringEngine
from service.errors import ClientDisconnected, DeadlineExceeded, InvalidInput, Overloaded
from service.metrics import ARRIVED_KEY, Metrics
from service.settings import Settings

log = logging.getLogger("hydra_rm.runtime")

# Requests up to this many items are tokenized on the event loop (cheaper than a thread hop for
# OpenRLHF's one-sample requests); bigger ones go to a thread so the loop keeps answering.
INLINE_ENCODE_ITEMS = 8
# Tokenizing is ~1 us/char here: a 14 MB query blocked the loop 9 s when this went by item count.
INLINE_ENCODE_CHARS = 32_000
# Large requests waiting for (or in) the tokenizer thread before new ones get 503: bounds the CPU and
# memory spent on requests the queue would likely refuse anyway.
TOKENIZER_BACKLOG = 64


class ScoringService:
    """The model-facing half of the app; the routes only translate between HTTP and this."""

    def __init__(self, settings: Settings, engine: ScoringEngine, metrics: Metrics) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        manifest = engine.manifest
        try:
            self.aggregation = validate_aggregation(
                settings.aggregation or manifest.default_aggregation, engine.num_heads
            )
        except ValueError as e:
            raise ValueError(f"HYDRA_RM_AGGREGATION: {e}") from e
        self.uwo_lambda = settings.uwo_lambda if settings.uwo_lambda is not None else manifest.uwo_lambda
        self.head_names = engine.head_names
        on_gpu = str(getattr(engine, "device", "cpu")).startswith("cuda")
        self.max_padding = (
            settings.max_padding if settings.max_padding is not None else (1.0 if on_gpu else 0.1)
        )
        self.batcher = Batcher(
            engine.forward,
            token_budget=engine.token_budget,
            max_batch_size=engine.max_batch_size,
            max_queue_items=settings.max_queue_items,
            max_queue_tokens=settings.max_queue_tokens,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_padding=self.max_padding,
            retry_after_s=settings.retry_after_s,
            observer=metrics.observe_batch,
            on_failure=lambda _: metrics.batch_failures.inc(),
            more_coming=lambda: metrics.arriving > 0,
        )
        self.ready = False
        self.draining = False
        self._drain_started: float | None = None
        self._tokenizing = 0  # large requests handed to the tokenizer thread and not back yet
        self._tokenizer_pool: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Warm up (first forward pays for lazy init), then start batching; only then ready."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.engine.warmup)
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hydra-rm-tokenize")
        self.batcher.start()
        self.metrics.set_heads(self.head_names)
        self.metrics.track_queue(lambda: self.batcher.queued_items, lambda: self.batcher.queued_tokens)
        info = self.engine.describe()
        self.metrics.model_info.labels(
            name=str(info["name"]), version=str(info["version"]), num_heads=str(self.engine.num_heads)
        ).set(1)
        self.ready = True
        self.metrics.ready.set(1)
        log.info(
            "ready: %s:%s, %d heads, aggregation=%s, token_budget=%d",
            info["name"],
            info["version"],
            self.engine.num_heads,
            self.aggregation,
            self.engine.token_budget,
        )

    def begin_drain(self) -> None:
        """SIGTERM: report not-ready and flush part-full batches at once (nobody else is coming).

        Called from a signal handler, so it only sets a flag and schedules the rest on the loop:
        taking a lock here (prometheus, asyncio) could deadlock against the interrupted code.
        """
        self.draining = True
        self._drain_started = time.monotonic()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._drain_on_loop)

    def _drain_on_loop(self) -> None:
        self.metrics.ready.set(0)
        self.batcher.flush_now()

    async def cut_drain(self) -> int:
        """The drain deadline is near: fail what is still queued with 503 `shutting_down` (see
        service/drain.py) so those requests are answered before uvicorn cancels them. Returns the
        number of items that will not be scored."""
        left = self.batcher.queued_items
        await self.batcher.close(0.0)
        return left

    async def stop(self) -> None:
        self.draining = True
        self.ready = False
        self.metrics.ready.set(0)
        # One drain budget in all: uvicorn already spent part of it waiting for in-flight requests,
        # and orchestrators kill at their grace period (Kubernetes: 30 s), not at twice ours.
        spent = time.monotonic() - self._drain_started if self._drain_started is not None else 0.0
        await self.batcher.close(max(1.0, self.settings.drain_timeout_s - spent))
        if self._tokenizer_pool is not None:
            self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    # -- request policy --------------------------------------------------------------------------
    def resolve_aggregation(self, requested: str | None) -> str:
        if requested is None:
            return self.aggregation
        try:
            return validate_aggregation(requested, self.engine.num_heads)
        except ValueError as e:
            raise InvalidInput(f"aggregation: {e}", field="aggregation") from e

    async def score_items(self, items: Sequence[Any], field: str, request: Request) -> list[ItemScore]:
        """What every scoring route does: count limit, tokenize, queue; errors name `field`."""
        self.check_count(len(items), field)
        return await self.score(await self.encode(items, field), request, field)

    def check_count(self, n: int, field: str) -> None:
        limit = self.settings.max_items_per_request
        if n > limit:
            raise InvalidInput(f"{field}: {n} items, at most {limit} per request (split it)", field=field)

    async def encode(self, items: Sequence[Any], field: str) -> list[EncodedItem]:
        """Tokenize before queueing, so bad or over-long items get a 4xx at once and the batcher
        budgets by real token counts."""
        b = self.batcher
        if len(items) <= b.max_queue_items < b.queued_items + len(items):  # full: skip the tokenizing
            raise Overloaded(f"queue full ({b.queued_items} items waiting); retry later", b.retry_after_s)
        small = len(items) <= INLINE_ENCODE_ITEMS and sum(map(_item_chars, items)) <= INLINE_ENCODE_CHARS
        if small or self._tokenizer_pool is None:
            return self._encode_all(items, field)
        if self._tokenizing >= TOKENIZER_BACKLOG:  # the one tokenizer thread is already that far behind
            raise Overloaded(
                f"{self._tokenizing} large requests waiting to be tokenized; retry later", b.retry_after_s
            )
        self._tokenizing += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._tokenizer_pool, self._encode_all, items, field)
        finally:
            self._tokenizing -= 1

    def _encode_all(self, items: Sequence[Any], field: str) -> list[EncodedItem]:
        out = []
        for i, item in enumerate(items):
            try:
                out.append(self.engine.encode(item))
            except ItemError as e:
                sub = "" if e.field == "item" else f".{e.field}"
                raise InvalidInput(f"{field}[{i}]{sub}: {e}", field=f"{field}[{i}]{sub}") from e
        return out

    async def score(
        self, encoded: Sequence[EncodedItem], request: Request, field: str = "items"
    ) -> list[ItemScore]:
        """Queue the items and wait for them, their deadline, or the client hanging up."""
        if not encoded:
            return []
        arrived = request.scope.get(ARRIVED_KEY, time.monotonic())
        try:
            job = self.batcher.submit(encoded, field)
        finally:
            self.metrics.submitted(request.scope)
        timeout = max(0.0, self.settings.request_timeout_s - (time.monotonic() - arrived))
        watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
        try:
            done, _ = await asyncio.wait(
                {job.future, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:  # server force-closing: free the queue slots
            self.batcher.cancel(job)
            raise
        finally:
            watcher.cancel()
        if job.future.done() and not job.future.cancelled():
            return job.future.result()  # raises ScoringFailed for a failed item
        self.batcher.cancel(job)  # its queued items never reach the encoder
        if watcher in done:
            raise ClientDisconnected("client disconnected before its items were scored")
        raise DeadlineExceeded(
            f"not scored within request_timeout_s={self.settings.request_timeout_s:g}s "
            f"({self.batcher.queued_items} items still queued); the server is overloaded"
        )

    def describe(self) -> dict[str, Any]:
        info = self.engine.describe()
        info.update(
            default_aggregation=self.aggregation,
            uwo_lambda=self.uwo_lambda,
            token_budget=self.engine.token_budget,
            max_batch_size=self.engine.max_batch_size,
        )
        return info


async def _wait_for_disconnect(receive: Receive) -> None:
    """After the body is read, the server's next receive() message is the client hanging up."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        if not message.get("more_body", False) and not message.get("body"):
            # A server that answers receive() at once after the body cannot signal a hang-up;
            # wait forever rather than spin.
            await asyncio.Event().wait()


def _item_chars(item: Any) -> int:
    get = item.get if isinstance(item, dict) else lambda k: getattr(item, k, None)
    n = sum(len(v) for v in (get("text"), get("prompt"), get("response")) if isinstance(v, str))
    for m in get("messages") or ():
        n += len(str(m.get("content", ""))) if isinstance(m, dict) else 0
    return n
