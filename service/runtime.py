"""What the routes share: the engine, the batcher, the metrics and the request-level policy
(aggregation defaults, limits, deadlines, client disconnects). One instance per app, built in the
lifespan once the model is loaded."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from starlette.requests import Request
from starlette.types import Receive

from model_store.aggregation import Aggregation
from model_store.tokenization import EncodedItem, Item, ItemError
from model_store.uncertainty import DisagreementQuantiles, NoveltyInfo, std_percentile
from scoring.interface import Engine, novelty_unavailable, require_served, served_novelty
from scoring.results import ItemScore
from scoring.settings import Settings
from service.batcher import Batcher
from service.errors import ClientDisconnected, DeadlineExceeded, InvalidInput, Overloaded
from service.metrics import Metrics
from service.middleware import ARRIVED_KEY, Arrivals
from service.tokenizing import TokenizerLane

log = logging.getLogger("hydra_rm.runtime")

# Requests up to this many items are tokenized on the event loop (cheaper than a thread hop for
# OpenRLHF's one-sample requests); bigger ones go to the tokenizer lane so the loop keeps answering.
INLINE_ENCODE_ITEMS = 8
# Tokenizing is ~1 us/char here: a 14 MB query blocked the loop 9 s when this went by item count.
INLINE_ENCODE_CHARS = 32_000
# Large requests waiting for (or in) the tokenizer lane before new ones get 503: bounds the CPU and
# memory spent on requests the queue would likely refuse anyway.
TOKENIZER_BACKLOG = 64
# ...and the characters they may queue (after the pre-cut): ~1 us/char, so ~32 s of tokenizing, well
# inside the default 150 s deadline; any one request under the default 16 MiB body limit fits.
TOKENIZER_BACKLOG_CHARS = 32_000_000


class ScoringService:
    """The model-facing half of the app; the routes only translate between HTTP and this."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        metrics: Metrics,
        arrivals: Arrivals | None = None,
        torch_thread: ThreadPoolExecutor | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.arrivals = arrivals or Arrivals()
        self.aggregation = settings.resolved_aggregation(engine)
        self.head_names = engine.head_names
        # The reference-split std quantiles stored at training time (None: percentiles are null).
        self.quantiles: DisagreementQuantiles | None = engine.manifest.disagreement
        # The novelty statistic's description (reference quantiles of u); None: no novelty anywhere.
        # None also where the model has one but this engine does not compute u (scoring/interface.py).
        self.novelty: NoveltyInfo | None = served_novelty(engine)
        self.novelty_unavailable = novelty_unavailable(engine)
        if self.novelty_unavailable is not None:
            log.warning(
                "%s has a novelty statistic that this engine does not serve (%s): responses carry no "
                "`novelty`, and `lcb` is refused",
                engine.name,
                self.novelty_unavailable,
            )
        overlap = getattr(engine, "concurrent_forwards", 1)
        if overlap > 1:  # its forward waits on another process (vLLM): the queued-ahead batch runs beside
            if torch_thread is not None:
                torch_thread.shutdown(wait=False)
            torch_thread = ThreadPoolExecutor(max_workers=overlap, thread_name_prefix="hydra-rm-forward")
        self.batcher = Batcher(
            engine.forward,
            engine.policy,
            max_queue_items=settings.max_queue_items,
            max_queue_tokens=settings.max_queue_tokens,
            max_wait_s=settings.max_wait_ms / 1000.0,
            retry_after_s=settings.retry_after_s,
            observer=(
                metrics.observe_batch
                if getattr(engine, "pads_batches", True)
                else functools.partial(metrics.observe_batch, padded_forward=False)
            ),
            on_failure=lambda _: metrics.batch_failures.inc(),
            more_coming=self.arrivals.more_coming,
            executor=torch_thread,
        )
        self.ready = False
        self.draining = False
        self._drain_started: float | None = None
        self.tokenizer: TokenizerLane | None = None  # started with the service
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Warm up (first forward pays for lazy init), then start batching; only then ready."""
        self._loop = asyncio.get_running_loop()
        await self.batcher.on_forward_thread(self.engine.warmup)  # where the model loaded and will run
        prefix = getattr(self.engine, "prefix", None)
        if prefix is not None:  # after warm-up, so the counters see traffic only
            prefix.on_plan = self.metrics.observe_prefix
        self.tokenizer = TokenizerLane(
            lambda item: self.engine.encode(item),  # looked up per call, as the inline path does
            max_requests=TOKENIZER_BACKLOG,
            max_chars=TOKENIZER_BACKLOG_CHARS,
            retry_after_s=self.settings.retry_after_s,
            timeout_s=self.settings.request_timeout_s,
        )
        self.tokenizer.start()
        self.batcher.start()
        self.metrics.set_heads(self.head_names)
        self.metrics.set_reference_p95(self.quantiles.p95 if self.quantiles is not None else None)
        self.metrics.set_novelty(self.novelty.quantiles if self.novelty is not None else None)
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
            self.aggregation.name,
            self.engine.policy.token_budget,
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
        if self.tokenizer is not None:
            self.tokenizer.stop()

    # -- request policy --------------------------------------------------------------------------
    def request_aggregation(
        self,
        requested: str | None,
        uwo_lambda: float | None,
        lcb_beta: float | None = None,
        stdp_beta: float | None = None,
    ) -> Aggregation:
        """A request's aggregation: what it asked for, else the server's; its lambda and betas, else the
        server's."""
        lam = self.aggregation.uwo_lambda if uwo_lambda is None else uwo_lambda
        beta = self.aggregation.lcb_beta if lcb_beta is None else lcb_beta
        sbeta = self.aggregation.stdp_beta if stdp_beta is None else stdp_beta
        if requested is None:
            return replace(self.aggregation, uwo_lambda=lam, lcb_beta=beta, stdp_beta=sbeta)
        try:
            agg = Aggregation.parse(requested, self.engine.num_heads, lam, beta, sbeta)
            # The manifest's statistic sets `stdp`'s scale whether or not u is computed (same rewards on
            # both engines); `lcb` needs u itself.
            return require_served(agg.bind(self.engine.manifest.novelty, self.quantiles), self.engine)
        except ValueError as e:
            raise InvalidInput(f"aggregation: {e}", field="aggregation") from e

    async def score_items(self, items: Sequence[Item], field: str, request: Request) -> list[ItemScore]:
        """What every scoring route does: count limit, tokenize, queue; errors name `field`."""
        self.check_count(len(items), field)
        deadline = _arrival(request) + self.settings.request_timeout_s
        return await self.score(await self.encode(items, field, deadline), request, field)

    def check_count(self, n: int, field: str) -> None:
        limit = self.settings.max_items_per_request
        if n > limit:
            raise InvalidInput(f"{field}: {n} items, at most {limit} per request (split it)", field=field)

    async def encode(self, items: Sequence[Item], field: str, deadline: float) -> list[EncodedItem]:
        """Tokenize before queueing, so bad or over-long items get a 4xx at once and the batcher
        budgets by real token counts. Small requests inline; the rest on the tokenizer lane, which
        serves the shortest first and gives up at `deadline` (time.monotonic)."""
        b = self.batcher
        if len(items) <= b.max_queue_items < b.queued_items + len(items):  # full: skip the tokenizing
            raise Overloaded(f"queue full ({b.queued_items} items waiting); retry later", b.retry_after_s)
        costs = [self.engine.items.chars(it) for it in items]
        small = len(items) <= INLINE_ENCODE_ITEMS and sum(costs) <= INLINE_ENCODE_CHARS
        if small or self.tokenizer is None:
            return self._encode_all(items, field)
        return await self.tokenizer.encode(items, costs, field, deadline)

    def _encode_all(self, items: Sequence[Item], field: str) -> list[EncodedItem]:
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
        arrived = _arrival(request)
        try:
            job = self.batcher.submit(encoded, field)
        finally:
            self.arrivals.done(request.scope)
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

    def std_percentile(self, std: float) -> float | None:
        """Where `std` falls among the reference split's stds (0-100); None without quantiles."""
        return std_percentile(std, self.quantiles)

    def novelty_percentile(self, u: float | None) -> float | None:
        """Where novelty `u` falls among the reference split's (0-100); None without the statistic."""
        if u is None or self.novelty is None:
            return None
        return std_percentile(u, self.novelty.quantiles)

    def describe(self) -> dict[str, Any]:
        return {
            **self.engine.describe(),
            "disagreement": self.quantiles,
            "default_aggregation": self.aggregation.name,
            "uwo_lambda": self.aggregation.uwo_lambda,
            "novelty": self.novelty,
            **({"novelty_unavailable": self.novelty_unavailable} if self.novelty_unavailable else {}),
            "token_budget": self.engine.policy.token_budget,
            "max_batch_size": self.engine.policy.max_batch_size,
            # The request limits, stated where clients read them (client/_core.py sizes requests by them).
            "max_items_per_request": self.settings.max_items_per_request,
            "max_body_bytes": self.settings.max_body_bytes,
        }


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


def _arrival(request: Request) -> float:
    """When the request arrived (stamped by ArrivalMiddleware): its deadline counts from here."""
    return request.scope.get(ARRIVED_KEY) or time.monotonic()
