"""The batch policy, decided once, and the batch-forming and failure-isolation steps it drives.

Pure functions and one frozen value, so they can be tested apart from any event loop; the service's
batcher and the JSONL job both plan with `BatchPolicy.plan` and isolate failures with
`forward_isolating`. Measured on this CPU (docs/architecture.md, bench/results/engine-cpu.md):
compute is nearly linear in *padded* tokens, so sorting by length and capping padded tokens per
batch is what pays; huge budgets lose to cache effects.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scoring.results import ItemScore

if TYPE_CHECKING:
    from model_store.tokenization import EncodedItem

log = logging.getLogger("hydra_rm.batching")

ForwardFn = Callable[[Sequence["EncodedItem"]], list[ItemScore]]
BatchObserver = Callable[[Sequence["EncodedItem"], Sequence[ItemScore], float], None]

# Defaults by device (bench/results/engine-cpu.md: on CPU a 1-2k token budget is best and 16k loses
# 12%; padding 8 random-length items together costs 40%, so the CPU padding cap is tight).
CPU_TOKEN_BUDGET, GPU_TOKEN_BUDGET = 2048, 65536
# 10% on CPU: padding costs linearly here (bench/results/engine-cpu.md). A cap of 0 won 1.33-1.82x only
# at load 20-35 on a shared machine (bench/results/peer-padding-ab-cpu.md); on the quiet machine the tree
# with cap 0 (and PASSIVE waits and the prompt cache) lost 0.62-0.78x to this one (bench/results/
# peer-merge-ab-cpu.md), and with the cap at 0.1 it beat cap 0 on GRPO and distinct items.
CPU_MAX_PADDING = 0.1
# GPU padding cap, from arithmetic (no GPU measurement yet; bench/gpu_e2e.py is the check).
# A decoder forward over n tokens of a model with N parameters does ~2*N*n FLOPs and reads the 2*N
# bytes of bf16 weights once, so its arithmetic intensity is ~n FLOP/byte. It turns compute-bound
# where n passes the GPU's FLOP/byte ridge: H100 SXM 989e12 bf16 FLOP/s / 3.35e12 B/s = ~295 tokens
# (H100 PCIe 378, H200 206, A100-80G 153). A 7-8B reward model's batches are past that (the budget
# plans for thousands of tokens), so every padded token costs as much as a real one:
# 2 * 8e9 FLOP / ~700e12 FLOP/s achieved = ~23 us. Splitting a batch in two costs one more weight
# read (16 GB / 3.35 TB/s = 4.8 ms, which is by definition the compute time of the ~295 ridge
# tokens) plus ~1.5 ms of kernel launches (32 layers x ~10 kernels x ~5 us), ~6.3 ms = ~275 tokens'
# compute. A split therefore pays once it saves more than ~300 padded tokens. With a padding share
# p of R real tokens wasting p*R tokens, p = 0.25 makes that break-even at R = 1,200 real tokens, a
# small GPU batch (4 GRPO items of ~300 tokens); larger batches would pay to split at lower p, but
# a window's items are length-sorted first, so what the cap still cuts is the few long-vs-short
# boundaries where p is large. 1.0 (the old default) let a batch compute twice its real tokens.
GPU_MAX_PADDING = 0.25


@dataclass(frozen=True)
class BatchPolicy:
    """How items are grouped into encoder batches: padded-token budget, item cap, padding cap."""

    token_budget: int = CPU_TOKEN_BUDGET
    max_batch_size: int = 64
    max_padding: float = CPU_MAX_PADDING
    prefix_sharing: bool = True  # keep prefix groups in one batch (scoring/prefix.py); the engine
    # turns it off for models that cannot share

    @classmethod
    def resolve(
        cls,
        device: str,
        *,
        token_budget: int | None = None,
        max_batch_size: int = 64,
        max_padding: float | None = None,
        prefix_sharing: bool = True,
    ) -> BatchPolicy:
        """The one place the device defaults are decided; explicit values (settings) win."""
        on_gpu = str(device).startswith("cuda")
        if token_budget is None:
            token_budget = GPU_TOKEN_BUDGET if on_gpu else CPU_TOKEN_BUDGET
        if max_padding is None:
            max_padding = GPU_MAX_PADDING if on_gpu else CPU_MAX_PADDING
        if token_budget < 1 or max_batch_size < 1 or max_padding < 0:
            raise ValueError("token_budget and max_batch_size must be >= 1 and max_padding >= 0")
        return cls(token_budget, max_batch_size, max_padding, prefix_sharing)

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Length-sorted batches under the token budget, each cut where padding would pass the cap."""
        out: list[list[int]] = []
        for planned in plan_batches(lengths, self.token_budget, self.max_batch_size):
            out.extend(split_by_padding(planned, lengths, self.max_padding))
        return out

    def plan_items(self, items: Sequence[EncodedItem]) -> list[list[int]]:
        """`plan` on the items' lengths; with prefix sharing, each group of items sharing a prompt stays
        in one batch where the budget (prefix counted once) allows, duplicates with their original."""
        if not self.prefix_sharing:
            return self.plan([e.n_tokens for e in items])
        return plan_shared_batches(
            [e.input_ids for e in items],
            token_budget=self.token_budget,
            max_batch_size=self.max_batch_size,
            max_padding=self.max_padding,
            plan_singles=self.plan,
        )


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens the encoder actually computes for a batch padded to its longest row."""
    return max(lengths, default=0) * len(lengths)


def plan_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int) -> list[list[int]]:
    """Group item indices into batches, shortest first, each within `token_budget` padded tokens.

    An item longer than the whole budget still gets a batch of its own (it cannot be split); every
    other batch satisfies `max(len) * n <= token_budget` and `n <= max_batch_size`. Each index
    appears exactly once.
    """
    if token_budget < 1 or max_batch_size < 1:
        raise ValueError("token_budget and max_batch_size must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = max(lengths[i], 1)
        new_longest = max(longest, n)
        if current and (new_longest * (len(current) + 1) > token_budget or len(current) >= max_batch_size):
            batches.append(current)
            current, new_longest = [], n
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def split_by_padding(batch: Sequence[int], lengths: Sequence[int], max_padding: float) -> list[list[int]]:
    """Cut a length-sorted batch wherever padding would pass `max_padding` of the real tokens.

    plan_batches caps padded tokens per batch; this also caps the waste. On CPU compute is linear
    in padded tokens and batching buys little (hidden 256: a window of 8 random single items padded
    together runs at 45 items/s, capped at 10% padding at 71, one at a time 74), so the CPU default
    is tight. On GPU a 7-8B model's batch is compute-bound past ~300 tokens, so padding costs
    FLOPs there too (GPU_MAX_PADDING above has the arithmetic).
    """
    out: list[list[int]] = []
    current: list[int] = []
    real = longest = 0
    for i in sorted(batch, key=lambda i: lengths[i]):
        n = max(lengths[i], 1)
        if current and max(longest, n) * (len(current) + 1) > (1.0 + max_padding) * (real + n):
            out.append(current)
            current, real, longest = [], 0, 0
        current.append(i)
        real += n
        longest = max(longest, n)
    if current:
        out.append(current)
    return out


# -- prefix planning: which items share a prompt, and batches that keep them together ----------

# Shorter shared runs are not worth an extra forward call: 16 groups of 8 with responses of 20-60
# tokens ran 0.87x at 8 shared tokens, 0.99x at 16, 1.22x at 32, 1.74x at 64 and 2.63x at 128
# (bench/results/prefix-cpu.md).
DEFAULT_MIN_SHARED = 32


@dataclass(frozen=True)
class PrefixGroup:
    """Items (indices into the planned list) whose first `prefix_len` tokens are identical."""

    prefix_len: int
    members: tuple[int, ...]


@dataclass
class PrefixPlan:
    """What to compute: shared groups, singletons, and where each input's result comes from."""

    source: list[int]  # for each input, the index of the identical input that is actually scored
    groups: list[PrefixGroup]
    singles: list[int]  # scored items in no group
    tokens_total: int  # tokens the inputs hold
    tokens_computed: int  # tokens the plan runs through the encoder

    @property
    def tokens_saved(self) -> int:
        return self.tokens_total - self.tokens_computed

    @property
    def shared_items(self) -> int:
        """Inputs whose computation was shared in part or whole (group members and duplicates)."""
        grouped = {i for g in self.groups for i in g.members}
        return sum(1 for i, s in enumerate(self.source) if s in grouped or s != i)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the identical leading run: binary search on C-speed slice comparison."""
    lo, hi = 0, min(len(a), len(b))
    if list(a[:hi]) == list(b[:hi]):
        return hi
    while hi - lo > 1:  # invariant: a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if list(a[:mid]) == list(b[:mid]):
            lo = mid
        else:
            hi = mid
    return lo


def plan_prefix_groups(
    seqs: Sequence[Sequence[int]],
    *,
    min_shared: int | None = DEFAULT_MIN_SHARED,
    keys: Sequence[Any] | None = None,
    max_group: int = 256,
) -> PrefixPlan:
    """Group sequences by shared leading token runs; exact duplicates are always collapsed.

    `keys` (default: the ids) decide what counts as a duplicate, e.g. ids + token types for encoders.
    `min_shared=None` turns sharing off (duplicates still collapse). Each group has >= 2 members, a
    shared run of >= `min_shared` tokens, and every member keeps >= 1 token of its own to pool at.
    Sorting the ids puts sequences with long common runs side by side; a dynamic program then cuts
    the sorted order into groups maximising the tokens saved (a shared system prompt of 40 tokens
    must not swallow eight groups that each share 500).
    """
    n = len(seqs)
    if keys is None:  # the common case, nothing shared: every item's first tokens differ (cheap to see)
        head = max(1, min_shared or DEFAULT_MIN_SHARED)
        if len({tuple(s[:head]) for s in seqs}) == n:  # so no duplicates and no shared runs of `head`
            total = sum(len(s) for s in seqs)
            return PrefixPlan(list(range(n)), [], list(range(n)), total, total)
    first: dict[Any, int] = {}
    source = []
    for i in range(n):
        key = tuple(seqs[i]) if keys is None else keys[i]
        source.append(first.setdefault(key, i))
    reps = [i for i in range(n) if source[i] == i]
    total = sum(len(s) for s in seqs)
    if min_shared is None or len(reps) < 2:
        return PrefixPlan(source, [], reps, total, sum(len(seqs[i]) for i in reps))
    min_shared = max(1, min_shared)
    order = sorted(reps, key=lambda i: (tuple(seqs[i]), i))
    m = len(order)
    lcp = [_common_prefix(seqs[order[k]], seqs[order[k + 1]]) for k in range(m - 1)]
    best = [0] * (m + 1)  # best[j]: most tokens saved over order[:j]
    cut: list[tuple[int, int]] = [(0, 0)] * (m + 1)  # (segment start, shared length) ending at j
    for j in range(1, m + 1):
        best[j], cut[j] = best[j - 1], (j - 1, 0)  # order[j-1] alone
        shared, shortest = 10**18, len(seqs[order[j - 1]])
        for i in range(j - 2, max(-1, j - 1 - max_group), -1):  # segment order[i:j]
            shared = min(shared, lcp[i])
            shortest = min(shortest, len(seqs[order[i]]))
            run = min(shared, shortest - 1)
            if shared < min_shared:
                break
            if run >= min_shared and best[i] + (j - 1 - i) * run > best[j]:
                best[j], cut[j] = best[i] + (j - 1 - i) * run, (i, run)
    groups: list[PrefixGroup] = []
    singles: list[int] = []
    j = m
    while j > 0:
        i, run = cut[j]
        if run:
            groups.append(PrefixGroup(run, tuple(sorted(order[i:j]))))
        else:
            singles.append(order[j - 1])
        j = i
    groups.reverse()
    singles.sort()
    computed = sum(len(seqs[i]) for i in reps) - best[m]
    return PrefixPlan(source, groups, singles, total, computed)


def plan_shared_batches(
    seqs: Sequence[Sequence[int]],
    *,
    token_budget: int,
    max_batch_size: int,
    max_padding: float = math.inf,
    min_shared: int | None = DEFAULT_MIN_SHARED,
    plan_singles: Callable[[Sequence[int]], list[list[int]]] | None = None,
) -> list[list[int]]:
    """Cut a window into encoder batches that keep each prefix group together where the budget allows.

    A group costs its prefix once plus its suffixes (what the encoder computes); one over the budget
    or `max_batch_size` is cut into chunks of similar suffix length, each sharing the prefix again.
    Items in no group are planned as without sharing (`plan_singles` on their lengths; default:
    length-sorted under the budget, cut at the padding cap).
    Exact duplicates ride in their original's batch for free. Batches come out in arrival order of
    their first item, so a window stays first-come first-served.
    """
    plan = plan_prefix_groups(seqs, min_shared=min_shared)
    copies: dict[int, list[int]] = {}
    for i, src in enumerate(plan.source):
        if src != i:
            copies.setdefault(src, []).append(i)
    lengths = [len(s) for s in seqs]
    batches: list[list[int]] = []
    for g in plan.groups:
        chunk: list[int] = []
        cost = g.prefix_len
        for i in sorted(g.members, key=lambda i: (lengths[i], i)):
            suffix = lengths[i] - g.prefix_len
            if chunk and (cost + suffix > token_budget or len(chunk) >= max_batch_size):
                batches.append(chunk)
                chunk, cost = [], g.prefix_len
            chunk.append(i)
            cost += suffix
        batches.append(chunk)
    singles = plan.singles
    single_lengths = [lengths[i] for i in singles]
    if plan_singles is not None:
        batches += [[singles[k] for k in b] for b in plan_singles(single_lengths)]
    else:
        for planned in plan_batches(single_lengths, token_budget, max_batch_size):
            batches += [
                [singles[k] for k in b] for b in split_by_padding(planned, single_lengths, max_padding)
            ]
    out = [sorted(b + [c for i in b for c in copies.get(i, ())]) for b in batches]
    out.sort(key=lambda b: b[0])
    return out


class WindowCost:
    """Tokens a window will compute as items join it, so a window (and its budget) holds whole groups.

    An item whose first `min_shared` tokens match an earlier item's costs only what follows their
    common run (the planner may find a better grouping; this is the batcher's cheap running estimate).
    """

    def __init__(self, min_shared: int = DEFAULT_MIN_SHARED) -> None:
        self.min_shared = max(1, min_shared)
        self._first: dict[tuple[int, ...], Sequence[int]] = {}

    def add(self, ids: Sequence[int]) -> int:
        if len(ids) <= self.min_shared:
            return len(ids)
        key = tuple(ids[: self.min_shared])
        first = self._first.get(key)
        if first is None:
            self._first[key] = ids
            return len(ids)
        return len(ids) - min(_common_prefix(first, ids), len(ids) - 1)


def forward_isolating(
    forward: ForwardFn,
    items: Sequence[EncodedItem],
    *,
    observer: BatchObserver | None = None,
    on_failure: Callable[[Exception], None] | None = None,
    skip: Callable[[int], bool] | None = None,
) -> list[ItemScore | Exception]:
    """Run one batch; if it raises (a poison item, an OOM), split it in halves and re-run, down to
    single items, so only the culprit fails, after O(log n) extra forwards. Halving is also the right
    answer to an OOM. Returns a score or the exception per item, in order; `skip(i)` drops items
    whose caller has gone (they get no forward). Runs on the caller's thread: the batcher calls it
    on its forward thread, the JSONL job inline."""
    out: list[ItemScore | Exception | None] = [None] * len(items)
    _isolate(forward, items, list(range(len(items))), out, observer, on_failure, skip)
    return [r if r is not None else _SKIPPED for r in out]


_SKIPPED = RuntimeError("skipped: its request was dropped before scoring")


def _isolate(
    forward: ForwardFn,
    items: Sequence[EncodedItem],
    idxs: list[int],
    out: list[ItemScore | Exception | None],
    observer: BatchObserver | None,
    on_failure: Callable[[Exception], None] | None,
    skip: Callable[[int], bool] | None,
) -> None:
    live = [i for i in idxs if skip is None or not skip(i)]
    if not live:
        return
    batch = [items[i] for i in live]
    start = time.perf_counter()
    try:
        scores = forward(batch)
        if len(scores) != len(batch):
            raise RuntimeError(f"engine returned {len(scores)} scores for {len(batch)} items")
    except Exception as e:  # noqa: BLE001 - any engine failure is isolated, never fatal
        if on_failure is not None:
            on_failure(e)
        if len(live) == 1:
            log.error("item failed alone: %s", type(e).__name__, exc_info=e)
            out[live[0]] = e
            return
        log.warning("batch of %d failed (%s: %s); splitting to isolate", len(live), type(e).__name__, e)
        half = len(live) // 2
        _isolate(forward, items, live[:half], out, observer, on_failure, skip)
        _isolate(forward, items, live[half:], out, observer, on_failure, skip)
        return
    if observer is not None:
        try:
            observer(batch, scores, time.perf_counter() - start)
        except Exception:  # metrics must never fail a request
            log.exception("batch observer failed")
    for i, s in zip(live, scores, strict=True):
        out[i] = s


def score_planned(
    forward: Callable[[Sequence[EncodedItem]], list[ItemScore]],
    policy: BatchPolicy,
    encoded: Sequence[EncodedItem],
) -> list[ItemScore]:
    """Score `encoded` in batches planned by `policy`, results in input order (every engine's `score`)."""
    results: list[ItemScore | None] = [None] * len(encoded)
    for idxs in policy.plan_items(encoded):
        for i, s in zip(idxs, forward([encoded[i] for i in idxs]), strict=True):
            results[i] = s
    return results  # type: ignore[return-value]
