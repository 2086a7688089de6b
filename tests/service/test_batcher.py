"""The batcher on its own, with a fake engine: no HTTP, no model, fully deterministic."""

from __future__ import annotations

import asyncio
import threading

import pytest

from model_store.tokenization import EncodedItem
from scoring.batching import BatchPolicy
from scoring.results import ItemScore
from service.batcher import Batcher
from service.errors import Overloaded, PayloadTooLarge, ScoringFailed


def item(n_tokens: int, tag: int = 0) -> EncodedItem:
    return EncodedItem([tag] + [7] * (n_tokens - 1), None, False, n_tokens)


class FakeEngine:
    """Reward = first token id; raises on token id 666; NaN on 999; can be held at a gate."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []  # token counts per successful batch
        self.seen: list[int] = []  # tags of items scored
        self.gate = threading.Event()
        self.gate.set()

    def forward(self, batch):
        self.gate.wait(30)
        tags = [e.input_ids[0] for e in batch]
        if 666 in tags:
            raise RuntimeError("poison")
        self.batches.append([e.n_tokens for e in batch])
        self.seen.extend(tags)
        out = []
        for e in batch:
            r = float("nan") if e.input_ids[0] == 999 else float(e.input_ids[0])
            out.append(ItemScore([r, r + 1], r, r + 1, r + 0.5, 0.5, e.n_tokens, e.truncated))
        return out


def make(engine: FakeEngine, **overrides) -> Batcher:
    policy = BatchPolicy(
        overrides.pop("token_budget", 64),
        overrides.pop("max_batch_size", 4),
        overrides.pop("max_padding", float("inf")),
    )
    kwargs = dict(max_queue_items=100, max_queue_tokens=10_000, max_wait_s=0.001)
    kwargs.update(overrides)
    b = Batcher(engine.forward, policy, **kwargs)
    b.start()
    return b


async def test_results_come_back_in_order_and_batches_respect_the_budget():
    engine = FakeEngine()
    b = make(engine)
    jobs = [b.submit([item(5 + (i * 7) % 30, tag=i) for i in range(j, j + 3)]) for j in range(0, 30, 3)]
    results = await asyncio.gather(*(j.future for j in jobs))
    for j, res in zip(range(0, 30, 3), results, strict=True):
        assert [s.rewards[0] for s in res] == [float(i) for i in range(j, j + 3)]
    for lengths in engine.batches:
        assert len(lengths) <= 4
        assert len(lengths) == 1 or max(lengths) * len(lengths) <= 64
    assert b.queued_items == 0 and b.queued_tokens == 0
    await b.close(1)


async def test_items_of_different_requests_share_a_batch():
    engine = FakeEngine()
    b = make(engine, max_wait_s=0.05)
    jobs = [b.submit([item(4, tag=i)]) for i in range(4)]  # all queued before the worker runs
    await asyncio.gather(*(j.future for j in jobs))
    assert engine.batches == [[4, 4, 4, 4]]
    await b.close(1)


async def test_full_queue_raises_overloaded_and_capacity_comes_back():
    engine = FakeEngine()
    engine.gate.clear()
    b = make(engine, max_queue_items=3, max_queue_tokens=1000, retry_after_s=7)
    first = b.submit([item(4, 1), item(4, 2)])
    b.submit([item(4, 3)])
    with pytest.raises(Overloaded) as info:
        b.submit([item(4, 4)])
    assert info.value.headers["Retry-After"] == "7"
    with pytest.raises(PayloadTooLarge):  # can never fit: a client error, not a retry
        b.submit([item(4)] * 4)
    engine.gate.set()
    await first.future
    await asyncio.sleep(0.05)
    assert b.queued_items == 0
    b.submit([item(4, 5)])  # room again
    await b.close(1)


async def test_token_capacity_is_enforced_too():
    engine = FakeEngine()
    engine.gate.clear()
    b = make(engine, max_queue_tokens=100)
    b.submit([item(60)])
    with pytest.raises(Overloaded):
        b.submit([item(50)])
    engine.gate.set()
    await b.close(1)


async def test_cancelled_requests_never_reach_the_engine():
    engine = FakeEngine()
    engine.gate.clear()
    b = make(engine, max_wait_s=0.0)
    held = b.submit([item(4, 1)])
    await asyncio.sleep(0.05)  # the worker is now inside forward, holding item 1
    dropped = b.submit([item(4, 2), item(8, 3)])
    kept = b.submit([item(4, 4)])
    b.cancel(dropped)
    assert b.queued_items == 2
    engine.gate.set()
    await held.future
    assert [s.rewards[0] for s in await kept.future] == [4.0]
    assert sorted(engine.seen) == [1, 4]  # items 2 and 3 were dropped before any forward
    assert b.queued_items == 0 and b.queued_tokens == 0
    await b.close(1)


async def test_a_poison_item_fails_only_its_request_after_log_n_splits():
    engine = FakeEngine()
    failures: list[Exception] = []
    b = Batcher(
        engine.forward,
        BatchPolicy(token_budget=1000, max_batch_size=16, max_padding=float("inf")),
        max_queue_items=100,
        max_queue_tokens=10_000,
        max_wait_s=0.05,
        on_failure=failures.append,
    )
    b.start()
    good = [b.submit([item(4, i)]) for i in range(1, 8)]
    bad = b.submit([item(4, 666), item(4, 100)])
    more = [b.submit([item(4, i)]) for i in range(8, 16)]
    with pytest.raises(ScoringFailed, match=r"scoring failed \(RuntimeError\)"):
        await bad.future
    assert [(await j.future)[0].rewards[0] for j in good] == [float(i) for i in range(1, 8)]
    assert [(await j.future)[0].rewards[0] for j in more] == [float(i) for i in range(8, 16)]
    assert 1 <= len(failures) <= 5  # 16 -> 8 -> 4 -> 2 -> 1
    assert b.queued_items == 0
    await b.close(1)


async def test_non_finite_reward_fails_that_request_only():
    engine = FakeEngine()
    b = make(engine, max_wait_s=0.05)
    nan_job = b.submit([item(4, 999)])
    ok_job = b.submit([item(4, 5)])
    with pytest.raises(ScoringFailed, match="non-finite"):
        await nan_job.future
    assert (await ok_job.future)[0].rewards[0] == 5.0
    await b.close(1)


async def test_close_finishes_queued_work_then_refuses_new_work():
    engine = FakeEngine()
    b = make(engine, max_wait_s=30.0)  # only the drain's flush releases these
    jobs = [b.submit([item(4, i)]) for i in range(3)]
    await b.close(5)
    assert all(j.future.done() and not j.future.cancelled() for j in jobs)
    assert [(j.future.result())[0].rewards[0] for j in jobs] == [0.0, 1.0, 2.0]
    with pytest.raises(Overloaded, match="shutting down"):
        b.submit([item(4)])


async def test_empty_request_resolves_at_once():
    b = make(FakeEngine())
    job = b.submit([])
    assert job.future.done() and job.future.result() == []
    await b.close(1)


@pytest.mark.parametrize("max_padding", [0.0, 0.1, 0.5, float("inf")])
def test_split_by_padding_caps_the_waste_and_keeps_every_item(max_padding):
    import random

    from scoring.batching import split_by_padding

    rng = random.Random(3)
    lengths = [rng.randint(1, 500) for _ in range(64)]
    batch = list(range(0, 64, 2))
    parts = split_by_padding(batch, lengths, max_padding)
    assert sorted(i for p in parts for i in p) == batch
    for p in parts:
        real = sum(lengths[i] for i in p)
        assert len(p) == 1 or max(lengths[i] for i in p) * len(p) <= (1 + max_padding) * real
    if max_padding == float("inf"):
        assert len(parts) == 1
    if max_padding == 0.0:
        assert all(len({lengths[i] for i in p}) == 1 for p in parts)


async def test_batches_of_very_different_lengths_are_not_padded_together():
    engine = FakeEngine()
    b = make(engine, token_budget=10_000, max_batch_size=64, max_wait_s=0.05, max_padding=0.1)
    jobs = [b.submit([item(n, tag=n)]) for n in (10, 11, 300, 310, 12)]
    await asyncio.gather(*(j.future for j in jobs))
    assert sorted(engine.batches) == [[10, 11, 12], [300, 310]]
    await b.close(1)


async def test_a_bug_in_batch_planning_fails_that_window_only(monkeypatch):
    engine = FakeEngine()
    b = make(engine)
    monkeypatch.setattr(BatchPolicy, "plan", lambda *a: 1 / 0)
    broken = b.submit([item(4, 1)])
    with pytest.raises(ScoringFailed, match="internal error"):
        await broken.future
    monkeypatch.undo()
    fine = b.submit([item(4, 2)])
    assert (await fine.future)[0].rewards[0] == 2.0  # the worker survived
    await b.close(1)


async def test_close_fails_the_window_in_flight_instead_of_hanging():
    """A drain that times out mid-batch answers those requests (503) and releases their capacity."""
    engine = FakeEngine()
    engine.gate.clear()  # the forward holds
    b = make(engine)
    job = b.submit([item(5, tag=1), item(6, tag=2)])
    await asyncio.sleep(0.05)  # the worker took the window and is inside the forward
    assert b.queued_items == 2
    await b.close(0.1)
    engine.gate.set()
    with pytest.raises(Overloaded, match="shut down"):
        await asyncio.wait_for(job.future, 5)
    assert (b.queued_items, b.queued_tokens) == (0, 0)


async def test_the_oldest_item_goes_first_and_leftovers_are_replanned_with_newcomers():
    """Each batch holds the oldest queued item; the window's other items wait at the queue's head and
    are planned again with later arrivals, so similar lengths from different moments share a batch."""
    engine = FakeEngine()
    engine.gate.clear()
    b = make(engine, token_budget=10_000, max_batch_size=64, max_wait_s=0.0, max_padding=0.1)
    old = [b.submit([item(n, tag=n)]) for n in (200, 10)]  # 200 is the older: its batch goes first
    await asyncio.sleep(0.05)  # the worker is inside that forward, held at the gate
    new = [b.submit([item(n, tag=n)]) for n in (11, 12)]
    engine.gate.set()
    await asyncio.gather(*(j.future for j in old + new))
    assert engine.batches == [[200], [10, 11, 12]]  # (planned once per window: 10 alone)
    assert (b.queued_items, b.queued_tokens, b._pending_tokens) == (0, 0, 0)
    await b.close(1)


async def test_a_request_dropped_while_its_items_wait_for_replanning_costs_no_forward():
    engine = FakeEngine()
    engine.gate.clear()
    b = make(engine, token_budget=10_000, max_batch_size=64, max_wait_s=0.0, max_padding=0.1)
    held = b.submit([item(300, tag=1)])
    await asyncio.sleep(0.05)
    keep = b.submit([item(10, tag=2)])
    drop = b.submit([item(100, tag=3), item(101, tag=4)])
    b.cancel(drop)
    engine.gate.set()
    await asyncio.gather(held.future, keep.future)
    assert sorted(engine.seen) == [1, 2]
    assert (b.queued_items, b.queued_tokens, b._pending_tokens) == (0, 0, 0)
    await b.close(1)


class SteppedEngine(FakeEngine):
    """Forward number k waits for `steps[k]`, so a test can hold exactly one batch."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.steps = [threading.Event() for _ in range(n)]
        self.calls = 0

    def forward(self, batch):
        k, self.calls = self.calls, self.calls + 1
        self.steps[k].wait(30)
        return super().forward(batch)


async def test_a_full_batch_is_queued_behind_the_running_one_a_part_full_one_is_not():
    """The forward thread goes from batch to batch without waiting on the event loop when a full
    batch is waiting; a part-full one stays in the queue to collect arrivals. A request dropped
    while its batch is queued costs no forward."""
    engine = SteppedEngine(4)
    b = make(engine, token_budget=40, max_batch_size=4, max_wait_s=0.0)
    first = b.submit([item(10, tag=1)])
    await asyncio.sleep(0.05)  # the worker is inside the first forward, held
    full = b.submit([item(10, tag=t) for t in (2, 3, 4, 5)])  # one budget's worth
    dropped = b.submit([item(10, tag=t) for t in (6, 7, 8, 9)])  # and another
    rest = b.submit([item(10, tag=10)])
    await asyncio.sleep(0.05)
    assert [len(batch) for batch in b._running] == [1]  # they arrived after the choice
    engine.steps[0].set()
    await first.future
    await asyncio.sleep(0.05)  # the second forward is held
    assert [len(batch) for batch in b._running] == [4, 4]  # one running, one full one queued
    b.cancel(dropped)
    for step in engine.steps[1:]:
        step.set()
    await asyncio.gather(full.future, rest.future)
    with pytest.raises(asyncio.CancelledError):
        await dropped.future
    assert set(engine.seen) == {1, 2, 3, 4, 5, 10}  # the dropped request never reached the engine
    assert (b.queued_items, b.queued_tokens, b._pending_tokens) == (0, 0, 0)
    await b.close(1)


async def test_a_batch_full_by_item_count_is_queued_ahead_too():
    """On GPU budgets (64k tokens) a batch fills by `max_batch_size` long before its tokens."""
    engine = SteppedEngine(4)
    b = make(engine, token_budget=10_000, max_batch_size=2, max_wait_s=0.0)
    first = b.submit([item(10, tag=1)])
    await asyncio.sleep(0.05)
    rest = b.submit([item(10, tag=t) for t in (2, 3, 4, 5)])
    engine.steps[0].set()
    await first.future
    await asyncio.sleep(0.05)
    assert [len(batch) for batch in b._running] == [2, 2]
    for step in engine.steps[1:]:
        step.set()
    await rest.future
    await b.close(1)
