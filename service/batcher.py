"""Cross-request dynamic batching: items from every concurrent request share encoder batches.

OpenRLHF sends one sample per HTTP request, thousands at once, so batching inside a request buys
nothing; batching across requests is where throughput comes from. Before each batch the worker
plans the head of the queue (a window of many batches' worth) into length-sorted batches with the
engine's `BatchPolicy` (token budget + padding cap: padding is the enemy on CPU, see
docs/architecture.md) and runs the one holding the oldest item, so items are served in arrival order
(long items cannot starve) while each batch is cut from everything waiting. Batches run on one
thread: concurrent forwards on 2 cores only fight over them.

Failure isolation is `batching.forward_isolating` (shared with the JSONL job): a batch that raises
is bisected down to the culprit, so one poison item fails only its own request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from model_store.tokenization import EncodedItem
from scoring.batching import BatchObserver, BatchPolicy, ForwardFn, WindowCost, forward_isolating
from scoring.results import NON_FINITE, ItemScore
from service.drain import ShuttingDown
from service.errors import Overloaded, PayloadTooLarge, ScoringFailed, ServiceError

log = logging.getLogger("hydra_rm.batcher")


# How much of the queue's head the planner sorts before choosing each batch: up to this many batches'
# worth of tokens, and at most WINDOW_ITEMS items (planning costs ~5 us an item on the event loop).
# Only the batch holding the oldest item runs; the rest go back to the queue's head and are planned
# again with what arrived meanwhile. So a bigger window sorts better without making newcomers wait
# (at 32 OpenRLHF clients, 32 batches' worth = everything queued: +3% items/s over 8,
# bench/results/ceiling-cpu.md).
WINDOW_BATCHES = 32
WINDOW_ITEMS = 1024


@dataclass(eq=False)
class Job:
    """One request's items; `future` resolves with their scores in input order."""

    items: Sequence[EncodedItem]
    future: asyncio.Future[list[ItemScore]]
    results: list[ItemScore | None] = field(init=False)
    remaining: int = field(init=False)
    tokens: int = field(init=False)
    outstanding: int = field(init=False)  # items still counted against the queue capacity
    pending_tokens: int = field(init=False)  # tokens of its items not yet taken by the worker
    arrived: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)
        self.remaining = len(self.items)
        self.outstanding = len(self.items)
        self.tokens = sum(e.n_tokens for e in self.items)
        self.pending_tokens = self.tokens

    @property
    def done(self) -> bool:
        return self.future.done()


@dataclass(eq=False)
class _Slot:
    job: Job
    index: int

    @property
    def item(self) -> EncodedItem:
        return self.job.items[self.index]


def forward_thread() -> ThreadPoolExecutor:
    """The single thread every torch call of a server runs on (model load, warm-up, forwards)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="hydra-rm-forward")


@dataclass(eq=False)
class _Launched:
    """A batch handed to the forward thread and the future of its results."""

    batch: list[_Slot]
    future: asyncio.Future[list[ItemScore | Exception]]


class Batcher:
    """Bounded queue + one worker task; engine calls run on a single dedicated thread."""

    def __init__(
        self,
        forward: ForwardFn,
        policy: BatchPolicy,
        *,
        max_queue_items: int,
        max_queue_tokens: int,
        max_wait_s: float,
        retry_after_s: int = 1,
        observer: BatchObserver | None = None,
        on_failure: Callable[[Exception], None] | None = None,
        more_coming: Callable[[], bool] | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self._forward = forward
        self.policy = policy
        self.token_budget = policy.token_budget
        self.max_queue_items = max_queue_items
        self.max_queue_tokens = max_queue_tokens
        self.max_wait_s = max_wait_s
        self.retry_after_s = retry_after_s
        self._observer = observer
        self._on_failure = on_failure
        self._more_coming = more_coming
        self._pending: deque[_Slot] = deque()
        self._pending_tokens = 0  # tokens of live (not cancelled) slots in _pending
        self.queued_items = 0  # accepted, not yet scored or dropped: what the capacity limits
        self.queued_tokens = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # The forward thread. The app passes the one thread that loaded the model: torch work on a
        # second thread gives the process a second OpenMP pool, and libgomp then throttles its spin-wait
        # (more threads than cores), so every op's threads sleep and wake: one-item forwards ran at
        # 0.71x (bench/results/contention-cpu.md).
        self._executor = executor if executor is not None else forward_thread()
        self._closing = False
        self._flush_now = False
        self._running: list[list[_Slot]] = []  # batches taken from the queue, not yet delivered

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hydra-rm-batcher")

    async def on_forward_thread(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the forward thread (the app's warm-up: torch work stays on one thread)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @property
    def alive(self) -> bool:
        """The worker task is running (it only ends on close or an escaped bug)."""
        return self._task is not None and not self._task.done()

    def flush_now(self) -> None:
        """Stop waiting for part-full batches (drain on SIGTERM: nobody else is coming)."""
        self._flush_now = True
        if self._wake is not None:
            self._wake.set()

    async def close(self, timeout_s: float) -> None:
        """Refuse new work, finish what is queued (up to `timeout_s`), then stop the worker."""
        self._closing = True
        self.flush_now()
        deadline = time.monotonic() + timeout_s
        while self.queued_items and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for slot in [*(s for batch in self._running for s in batch), *self._pending]:  # drain timed out
            self._fail(slot.job, ShuttingDown("server shut down before scoring; retry", self.retry_after_s))
        self._pending.clear()
        self._running = []
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- requests --------------------------------------------------------------------------------
    def submit(self, items: Sequence[EncodedItem], field: str = "items") -> Job:
        """Queue a request's items, or raise Overloaded (503) when accepting them would overflow."""
        assert self._wake is not None, "Batcher.start() was not called"
        loop = asyncio.get_running_loop()
        job = Job(items, loop.create_future())
        if not items:
            job.future.set_result([])
            return job
        if self._closing:
            raise ShuttingDown("server is shutting down; retry", self.retry_after_s)
        if len(items) > self.max_queue_items or job.tokens > self.max_queue_tokens:
            raise PayloadTooLarge(  # permanent: retrying the same request cannot help
                f"request of {len(items)} items / {job.tokens} tokens exceeds the whole queue "
                f"({self.max_queue_items} items / {self.max_queue_tokens} tokens); split it",
                field=field,
            )
        if (
            self.queued_items + len(items) > self.max_queue_items
            or self.queued_tokens + job.tokens > self.max_queue_tokens
        ):
            raise Overloaded(
                f"queue full ({self.queued_items} items, {self.queued_tokens} tokens waiting); retry later",
                self.retry_after_s,
            )
        self.queued_items += len(items)
        self.queued_tokens += job.tokens
        self._pending_tokens += job.tokens
        self._pending.extend(_Slot(job, i) for i in range(len(items)))
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a request (deadline passed, client gone): its queued items never reach the encoder."""
        if not job.future.done():
            job.future.cancel()
        self._release(job)

    def _release(self, job: Job) -> None:
        """Give back the capacity of items that will not be scored now; pending slots are skipped."""
        if job.outstanding:
            unscored = sum(job.items[i].n_tokens for i, r in enumerate(job.results) if r is None)
            self.queued_items -= job.outstanding
            self.queued_tokens -= unscored
            self._pending_tokens -= job.pending_tokens
            job.outstanding = job.pending_tokens = 0

    def _fail(self, job: Job, error: ServiceError) -> None:
        if not job.future.done():
            job.future.set_exception(error)
        self._release(job)

    # -- worker ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        """Keep the forward thread busy: while one batch runs, the next is already queued behind it
        when a full batch's worth is waiting, so the thread goes straight on instead of idling while
        this loop (busy parsing and tokenizing requests) hands it the next one. That hand-over cost
        ~3% of the wall time at 32 clients; with the batch queued ahead the encoder is busy 99.5% of
        it (bench/results/ceiling-cpu.md). A part-full batch is never taken early: it waits here to
        collect what arrives meanwhile."""
        assert self._wake is not None
        ahead: _Launched | None = None
        while True:
            if ahead is None:
                await self._wake.wait()
                self._wake.clear()
                self._drop_dead_head()
                if not self._pending:
                    continue
                await self._gather()
                current = self._launch()
            else:
                current, ahead = ahead, None
            if not self._closing and (
                self._pending_tokens >= self.token_budget or len(self._pending) >= self.policy.max_batch_size
            ):
                ahead = self._launch()
            if current is not None:
                await self._finish(current)
            if ahead is None and self._pending:
                self._wake.set()

    def _launch(self) -> _Launched | None:
        """Take the next batch and queue it on the forward thread (None if nothing live was left)."""
        window = self._take_window()
        self._running.append(window)  # until the plan picks, the whole window is in hand
        try:
            batch = self._choose_batch(window)
        except Exception:  # a planning bug costs this window's requests, not the whole server
            log.exception("batch planning failed on a window of %d items", len(window))
            self._running.remove(window)
            for slot in window:
                self._fail(slot.job, ScoringFailed("internal error while batching (logged on the server)"))
            return None
        self._running[-1] = batch
        if not batch:
            self._running.pop()
            return None
        future = asyncio.get_running_loop().run_in_executor(
            self._executor,
            lambda: forward_isolating(
                self._forward,
                [s.item for s in batch],
                observer=self._observer,
                on_failure=self._on_failure,
                skip=lambda i: batch[i].job.done,  # a request dropped by then costs no forward
            ),
        )
        return _Launched(batch, future)

    async def _finish(self, launched: _Launched) -> None:
        """Wait for a launched batch and resolve its slots (a bug here fails them, never hangs them)."""
        batch = launched.batch
        try:
            results = await launched.future
            for slot, result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    # The engine's own text can carry paths or device details: the log has it, the
                    # caller a summary.
                    self._fail(
                        slot.job,
                        ScoringFailed(f"scoring failed ({type(result).__name__}); details in the server log"),
                    )
                else:
                    self._complete(slot, result)
        except Exception:
            log.exception("batch worker failed on a batch of %d items", len(batch))
            for slot in batch:
                self._fail(slot.job, ScoringFailed("internal error while batching (logged on the server)"))
        # Not on cancellation (close): close() fails what is still in hand.
        self._running = [b for b in self._running if b is not batch]

    def _drop_dead_head(self) -> None:
        while self._pending and self._pending[0].job.done:
            self._pending.popleft()

    async def _gather(self) -> None:
        """Hold a part-full batch for requests already arriving, up to max_wait from the oldest item.

        Waiting for requests that may never come is pure loss (a lone client would pay max_wait on
        every call), so without `more_coming` evidence the batch goes at once; under load, batches
        fill from what queued up during the previous forward anyway.
        """
        assert self._wake is not None
        while self._pending and not self._flush_now and self._pending_tokens < self.token_budget:
            if self._more_coming is not None and not self._more_coming():
                return
            remaining = self.max_wait_s - (time.monotonic() - self._pending[0].job.arrived)
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return
            self._wake.clear()
            self._drop_dead_head()

    def _take_window(self) -> list[_Slot]:
        window: list[_Slot] = []
        tokens, limit = 0, self.token_budget * WINDOW_BATCHES
        # With prefix sharing the limit counts what the encoder will compute (a group's prompt once),
        # so a GRPO group arriving as G requests lands in one window instead of being cut in two.
        cost = WindowCost() if self.policy.prefix_sharing else None
        while self._pending and tokens < limit and len(window) < WINDOW_ITEMS:
            slot = self._pending.popleft()
            if slot.job.done:
                continue
            n = slot.item.n_tokens
            window.append(slot)
            tokens += cost.add(slot.item.input_ids) if cost is not None else n
            slot.job.pending_tokens -= n
            self._pending_tokens -= n
        return window

    def _choose_batch(self, window: list[_Slot]) -> list[_Slot]:
        """The planned batch holding the window's oldest item; the window's other items go back to the
        head of the queue, in order, to be planned again with the next arrivals."""
        if not window:
            return []
        plan = self.policy.plan_items([s.item for s in window])
        chosen = next(idxs for idxs in plan if 0 in idxs)  # window[0] is the oldest live item
        taken = set(chosen)
        for i in range(len(window) - 1, -1, -1):
            if i not in taken:
                slot = window[i]
                self._pending.appendleft(slot)
                slot.job.pending_tokens += slot.item.n_tokens
                self._pending_tokens += slot.item.n_tokens
        return [window[i] for i in chosen]

    def _complete(self, slot: _Slot, score: ItemScore) -> None:
        job = slot.job
        if job.done:
            return
        if not score.finite:
            self._fail(job, ScoringFailed(f"{NON_FINITE} for this item"))
            return
        job.results[slot.index] = score
        job.remaining -= 1
        job.outstanding -= 1
        self.queued_items -= 1
        self.queued_tokens -= slot.item.n_tokens
        if job.remaining == 0:
            job.future.set_result(job.results)  # type: ignore[arg-type]
