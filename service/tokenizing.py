"""The tokenizer lane: large requests are tokenized on one thread, shortest remaining work first.

Tokenizing costs ~1 us per character here (docs/architecture.md), and one 15.6 MB conversation took
~20 s: on a FIFO thread every request behind it waited, and a request's deadline was only checked
after its tokenizing. So the lane
- picks, between items, the request with the fewest characters left (a 16-item request of short
  texts waits for at most one item of a huge one, not for the huge one);
- drops a request at its deadline (measured from arrival) or when its caller gives up, instead of
  spending the CPU on an answer nobody will read;
- bounds its backlog by characters as well as by requests: past either, new work gets 503.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from model_store.tokenization import EncodedItem, Item, ItemError
from service.errors import DeadlineExceeded, InvalidInput, Overloaded, PayloadTooLarge

# Work done for one request before the lane looks again for a shorter one (one item at least).
SLICE_S = 0.005


@dataclass(eq=False)
class _Task:
    items: Sequence[Item]
    costs: Sequence[int]
    field: str
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[EncodedItem]]
    remaining: int
    out: list[EncodedItem] = field(default_factory=list)
    abandoned: bool = False  # the caller stopped waiting (deadline, hang-up, shutdown)


class TokenizerLane:
    """One tokenizer thread shared by every large request; see the module docstring for the policy."""

    def __init__(
        self,
        encode: Callable[[Item], EncodedItem],
        *,
        max_requests: int,
        max_chars: int,
        retry_after_s: int = 1,
        timeout_s: float = 150.0,
    ) -> None:
        self._encode = encode
        self.max_requests = max_requests
        self.max_chars = max_chars
        self.retry_after_s = retry_after_s
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._tasks: list[_Task] = []
        self.pending_chars = 0
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> int:
        """Requests waiting for or in the tokenizer."""
        return len(self._tasks)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hydra-rm-tokenize", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            tasks, self._tasks = self._tasks, []
            self.pending_chars = 0
            self._cond.notify_all()
        for t in tasks:
            self._resolve(t, Overloaded("server shut down before tokenizing", self.retry_after_s))

    async def encode(
        self, items: Sequence[Item], costs: Sequence[int], field: str, deadline: float
    ) -> list[EncodedItem]:
        """Tokenize `items` (each costing `costs[i]` characters) by `deadline` (time.monotonic)."""
        total = sum(costs)
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._stopped:
                raise Overloaded("server is shutting down", self.retry_after_s)
            if total > self.max_chars:  # permanent: retrying the same request cannot help
                raise PayloadTooLarge(
                    f"{field}: {total} characters to tokenize, over the tokenizer's backlog of "
                    f"{self.max_chars}; split the request",
                    field=field,
                )
            if len(self._tasks) >= self.max_requests or self.pending_chars + total > self.max_chars:
                raise Overloaded(
                    f"{len(self._tasks)} large requests ({self.pending_chars} characters) waiting to be "
                    "tokenized; retry later",
                    self.retry_after_s,
                )
            task = _Task(items, costs, field, deadline, loop, loop.create_future(), total)
            self._tasks.append(task)
            self.pending_chars += total
            self._cond.notify()
        try:
            timeout = max(0.0, deadline - time.monotonic())
            return await asyncio.wait_for(asyncio.shield(task.future), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"not tokenized within request_timeout_s={self.timeout_s:g}s ({self.requests} large "
                "requests tokenizing); the server is overloaded"
            ) from None
        finally:
            task.abandoned = True  # the thread drops it at its next look, if it has not finished

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._tasks and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                for t in [t for t in self._tasks if t.abandoned or time.monotonic() > t.deadline]:
                    self._remove(t)  # its caller answers 504 (or is gone) on its own
                if not self._tasks:
                    continue
                task = min(self._tasks, key=lambda t: t.remaining)  # shortest remaining work first
            self._work_on(task)

    def _work_on(self, task: _Task) -> None:
        start = time.monotonic()
        while not task.abandoned and len(task.out) < len(task.items):
            i = len(task.out)
            try:
                task.out.append(self._encode(task.items[i]))
            except ItemError as e:
                sub = "" if e.field == "item" else f".{e.field}"
                where = f"{task.field}[{i}]{sub}"
                self._finish(task, InvalidInput(f"{where}: {e}", field=where))
                return
            except Exception as e:  # noqa: BLE001 - a bug is the request's 500, never the lane's death
                self._finish(task, e)
                return
            with self._cond:
                task.remaining -= task.costs[i]
                self.pending_chars -= task.costs[i]
            now = time.monotonic()
            if now > task.deadline or now - start > SLICE_S:
                break
        if len(task.out) == len(task.items):
            self._finish(task, task.out)

    def _finish(self, task: _Task, result: list[EncodedItem] | BaseException) -> None:
        with self._cond:
            self._remove(task)
        self._resolve(task, result)

    def _remove(self, task: _Task) -> None:
        if task in self._tasks:
            self._tasks.remove(task)
            self.pending_chars -= task.remaining
            task.remaining = 0

    @staticmethod
    def _resolve(task: _Task, result: list[EncodedItem] | BaseException) -> None:
        def settle() -> None:
            if task.future.done() or (task.abandoned and not isinstance(result, Overloaded)):
                return  # nobody waits for it: setting an exception would only log "never retrieved"
            if isinstance(result, BaseException):
                task.future.set_exception(result)
            else:
                task.future.set_result(result)

        if not task.loop.is_closed():
            task.loop.call_soon_threadsafe(settle)
