"""Shared-prefix scoring: a prompt shared by G responses is encoded once, not G times.

GRPO/RLOO trainers score each prompt with G = 4-16 responses, usually one request per response. A
causal decoder's hidden states over a leading run of tokens do not depend on what follows, so the
run's keys/values can be computed once and every suffix scored against them: exact up to float
rounding. Planning works on token ids only (no `prompt` field), so every route and the batch job
share it; identical sequences are scored once and fanned out.

How suffixes are batched decides the gain. On CPU compute is linear in padded tokens, so suffixes
run in length-sorted sub-batches under the padding cap, each against its group's cached keys/values
expanded to the sub-batch (`group_sorted`). Measured on 12 prompts x 8 (bench/results/prefix-cpu.md,
shared machine): group_sorted 3.00x over no sharing, one suffix per forward 2.94x, suffixes of
several groups batched with padded prefixes 2.40x, all G suffixes padded together 1.91x. On GPU the
same sub-batches grow with the padding cap.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import torch
from torch import nn

from model_store.tokenization import EncodedItem
from scoring.batching import (
    DEFAULT_MIN_SHARED,
    BatchPolicy,
    PrefixGroup,
    PrefixPlan,
    plan_prefix_groups,
    split_by_padding,
)
from scoring.heads import HeadForward, is_decoder
from scoring.results import ItemScore

log = logging.getLogger("hydra_rm.prefix")

SuffixBatching = Literal["one", "group_padded", "group_sorted", "cross_sorted"]


# Prompt keys/values kept across batches (and requests), least recently used evicted: a GRPO group split
# over two batches (its prompt plus 8 suffixes often passes the 2,048-token CPU budget) or arriving
# over several requests encodes its prompt once, as vLLM's prefix cache does. Bounded in bytes: a
# 700-token prompt of the 256x4 Qwen2 bench model holds ~2.9 MB; a 7B model's ~90 MB (bf16).
PREFIX_CACHE_BYTES = 256 * 2**20

Caches = list[tuple[torch.Tensor, torch.Tensor]]


class PrefixCache:
    """Prompts' per-layer keys/values by their token ids, least recently used first out.

    `find` returns the longest cached prompt that starts `ids` and leaves it at least one token of
    its own; lookups go through the first `min_shared` tokens, so a miss costs one dict probe."""

    def __init__(self, max_bytes: int = PREFIX_CACHE_BYTES, min_shared: int = DEFAULT_MIN_SHARED) -> None:
        self.max_bytes = max_bytes
        self.min_shared = max(1, min_shared)
        self.bytes = 0
        self._lru: OrderedDict[tuple[int, ...], tuple[Caches, int]] = OrderedDict()
        self._by_head: dict[tuple[int, ...], set[tuple[int, ...]]] = {}

    def __len__(self) -> int:
        return len(self._lru)

    def find(self, ids: Sequence[int], longest: int | None = None) -> tuple[int, Caches] | None:
        """(prefix length, caches) of the longest cached prefix of `ids` (at most `longest` tokens)."""
        limit = len(ids) - 1 if longest is None else min(longest, len(ids) - 1)
        best: tuple[int, ...] | None = None
        for key in self._by_head.get(tuple(ids[: self.min_shared]), ()):
            if (
                len(key) <= limit
                and (best is None or len(key) > len(best))
                and list(ids[: len(key)]) == list(key)
            ):
                best = key
        if best is None:
            return None
        self._lru.move_to_end(best)
        return len(best), self._lru[best][0]

    def put(self, ids: Sequence[int], caches: Caches) -> None:
        key = tuple(ids)
        if len(key) < self.min_shared or key in self._lru:
            return
        size = sum(k.nbytes + v.nbytes for k, v in caches)
        if size > self.max_bytes:
            return
        self._lru[key] = (caches, size)
        self._by_head.setdefault(key[: self.min_shared], set()).add(key)
        self.bytes += size
        while self.bytes > self.max_bytes:
            old, (_, old_size) = self._lru.popitem(last=False)
            self.bytes -= old_size
            heads = self._by_head[old[: self.min_shared]]
            heads.discard(old)
            if not heads:
                del self._by_head[old[: self.min_shared]]

    def clear(self) -> None:
        self._lru.clear()
        self._by_head.clear()
        self.bytes = 0


def _cache_kwarg(model: nn.Module) -> str:
    """The keyword a decoder's forward takes its KV cache by: `cache` from transformers 5.2x,
    `past_key_values` before (5.17 ignored `cache` silently, so sharing disabled itself on a GPU host)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def is_causal_decoder(model: nn.Module) -> bool:
    """Only causal decoders may share: an encoder's early states depend on later tokens.

    Decoders here are the `score`-headed sequence classifiers (Llama/Qwen2/Mistral/GPT-2...); a
    bidirectional config flag or an encoder-decoder is refused outright, and the engine's
    self-check (sharing on vs off on a probe) catches what no flag announces.
    """
    config = getattr(model, "config", None)
    if not is_decoder(model) or config is None:
        return False
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "use_bidirectional_attention", False):
        return False
    return True


@dataclass
class PrefixStats:
    """Running totals for metrics (read by the batcher's observer; one forward thread writes)."""

    items: int = 0
    shared_items: int = 0
    tokens_total: int = 0
    tokens_saved: int = 0
    groups: int = 0
    cache_hits: int = 0  # prompts taken from the cross-batch cache instead of encoded
    last: PrefixPlan | None = field(default=None, repr=False)


class PrefixHost(Protocol):
    """What the prefix scorer needs of its engine (ScoringEngine is one): its heads, batch policy and
    longest item."""

    heads: HeadForward
    policy: BatchPolicy
    max_length: int


class PrefixScorer:
    """What `ScoringEngine.forward` runs unless sharing is off: duplicates collapsed for every model,
    prefixes shared for causal decoders that pass the self-check; `engine.forward_padded` does the
    plain padded passes."""

    def __init__(
        self,
        engine: PrefixHost,
        *,
        enabled: bool = True,
        min_shared: int = DEFAULT_MIN_SHARED,
        max_padding: float | None = None,
        suffix_batching: SuffixBatching = "group_sorted",
        check: bool = True,
        cache_bytes: int = PREFIX_CACHE_BYTES,
    ) -> None:
        self.engine = engine
        self.heads = engine.heads
        self.enabled = enabled
        self.min_shared = min_shared
        self.max_padding = engine.policy.max_padding if max_padding is None else max_padding
        self.suffix_batching: SuffixBatching = suffix_batching
        self.stats = PrefixStats()
        self.cache = PrefixCache(cache_bytes, min_shared)
        self.on_plan: Callable[[PrefixPlan], None] | None = None  # metrics hook, after each success
        # Branched heads (scoring/branches.py) run their own last layers over the whole sequence: they
        # are scored by the plain padded pass.
        self.sharing = (
            enabled
            and engine.heads.branches is None
            and is_causal_decoder(engine.heads.model)
            and self._windows_cover(engine)
        )
        if self.sharing and check:
            self.sharing = self._self_check()
            self.cache.clear()  # the probe's prompt is nobody's

    # -- public ----------------------------------------------------------------------------------
    def forward(self, batch: Sequence[EncodedItem]) -> list[ItemScore]:
        """Score `batch` (results in its order); equal to `engine.forward` up to float rounding."""
        if not batch:
            return []
        typed = any(e.token_type_ids is not None for e in batch)
        keys = [(tuple(e.input_ids), tuple(e.token_type_ids or ())) for e in batch] if typed else None
        plan = plan_prefix_groups(
            [e.input_ids for e in batch],
            min_shared=self.min_shared if self.sharing and not typed else None,
            keys=keys,
        )
        scored: dict[int, ItemScore] = {}
        lengths = [e.n_tokens for e in batch]
        singles, groups, saved = plan.singles, plan.groups, 0
        if self.sharing and not typed and len(self.cache):  # a prompt seen in an earlier batch
            runs = [self._cached_run(batch, g) for g in groups]
            saved = sum(
                run.prefix_len - (g.prefix_len - run.prefix_len) * len(g.members) for g, run in runs if run
            )
            groups = [run or g for g, run in runs]
            hits: dict[int, tuple[int, list[int]]] = {}  # cached prompt -> (its length, items here)
            for i in singles:
                h = self.cache.find(batch[i].input_ids)
                if h is not None:
                    hits.setdefault(id(h[1]), (h[0], []))[1].append(i)
            hit = {i for _, members in hits.values() for i in members}
            singles = [i for i in singles if i not in hit]
            groups = groups + [PrefixGroup(n, tuple(members)) for n, members in hits.values()]
            saved += sum(n * len(members) for n, members in hits.values())
        for idxs in split_by_padding(singles, lengths, self.max_padding):
            scored.update(zip(idxs, self.heads.forward_padded([batch[i] for i in idxs]), strict=True))
        if groups:
            scored.update(self._score_groups(batch, groups))
        if saved:  # what stats and metrics read: this batch's plan as run, the cache's savings included
            plan = replace(plan, groups=groups, singles=singles, tokens_computed=plan.tokens_computed - saved)
        st = self.stats
        st.items += len(batch)
        st.shared_items += plan.shared_items
        st.tokens_total += plan.tokens_total
        st.tokens_saved += plan.tokens_saved
        st.groups += len(plan.groups)
        st.last = plan
        if self.on_plan is not None:
            self.on_plan(plan)
        out = []
        for i, src in enumerate(plan.source):
            s = scored[src]
            if src != i:  # a duplicate gets its own copy and its own bookkeeping
                s = replace(
                    s, rewards=list(s.rewards), tokens=batch[i].n_tokens, truncated=batch[i].truncated
                )
            out.append(s)
        return out

    # -- execution -------------------------------------------------------------------------------
    def _score_groups(self, batch: Sequence[EncodedItem], groups: list[PrefixGroup]) -> dict[int, ItemScore]:
        """Encode each prefix once, then every suffix against its group's cached keys/values."""
        caches = [self._prefix_caches(batch[g.members[0]].input_ids[: g.prefix_len]) for g in groups]
        rows = [(gi, i) for gi, g in enumerate(groups) for i in g.members]
        suffix_len = {i: batch[i].n_tokens - groups[gi].prefix_len for gi, i in rows}
        mode = self.suffix_batching
        if mode == "one":
            plan = [[r] for r in range(len(rows))]
        elif mode == "group_padded":
            plan = [[r for r, (gi, _) in enumerate(rows) if gi == g] for g in range(len(groups))]
        elif mode == "group_sorted":
            plan = []
            for g in range(len(groups)):
                mine = [r for r, (gi, _) in enumerate(rows) if gi == g]
                plan += split_by_padding(
                    mine, [suffix_len[rows[r][1]] for r in range(len(rows))], self.max_padding
                )
        else:  # cross_sorted: suffixes of different groups share a batch, prefixes padded in the cache
            cost = [suffix_len[i] for _, i in rows]
            plan = split_by_padding(list(range(len(rows))), cost, self.max_padding)
        cap = max(1, self.engine.policy.max_batch_size)
        out: dict[int, ItemScore] = {}
        for sub in plan:
            for k in range(0, len(sub), cap):
                part = [rows[r] for r in sub[k : k + cap]]
                scores = self._score_suffixes(batch, groups, caches, part)
                out.update(zip((i for _, i in part), scores, strict=True))
        return out

    def _cached_run(
        self, batch: Sequence[EncodedItem], g: PrefixGroup
    ) -> tuple[PrefixGroup, PrefixGroup | None]:
        """(g, the group sharing a cached prompt instead, or None). A shorter cached prompt is taken when
        the tokens its members then run again cost less than encoding the longer run (a split group's
        second chunk may share a few response tokens more than the first did)."""
        hit = self.cache.find(batch[g.members[0]].input_ids, longest=g.prefix_len)
        if hit is None or (g.prefix_len - hit[0]) * len(g.members) >= hit[0]:
            return g, None
        return g, PrefixGroup(hit[0], g.members)

    def _prefix_caches(self, ids: list[int]) -> Caches:
        """The prompt's keys/values: from the cross-batch cache when it holds exactly this prompt, else
        encoded here and kept there (only while sharing is on: the self-check probe is not kept)."""
        hit = self.cache.find(ids + [0], longest=len(ids)) if self.sharing else None
        if hit is not None and hit[0] == len(ids):
            self.stats.cache_hits += 1
            return hit[1]
        caches = self._encode_prefix(ids)
        if self.sharing:
            self.cache.put(ids, caches)
        return caches

    def _encode_prefix(self, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One forward over the prefix alone; its per-layer keys/values (batch of 1)."""
        from transformers import DynamicCache

        e = self.heads
        with torch.inference_mode():
            cache = DynamicCache(config=e.model.config)
            e.model.base_model(
                input_ids=torch.tensor([ids], device=e.device),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=e.device),
                position_ids=torch.arange(len(ids), device=e.device)[None],
                use_cache=True,
                **{_cache_kwarg(e.model.base_model): cache},
            )
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _score_suffixes(
        self,
        batch: Sequence[EncodedItem],
        groups: list[PrefixGroup],
        caches: list[list[tuple[torch.Tensor, torch.Tensor]]],
        part: list[tuple[int, int]],
    ) -> list[ItemScore]:
        """One forward of suffixes against their prefixes' keys/values; results in `part` order."""
        from transformers import DynamicCache

        e = self.heads
        n = len(part)
        plens = [groups[gi].prefix_len for gi, _ in part]
        sufs = [batch[i].input_ids[groups[gi].prefix_len :] for gi, i in part]
        p_max, s_max = max(plens), max(len(s) for s in sufs)
        ids = torch.full((n, s_max), e.pad_id, dtype=torch.long)
        smask = torch.zeros((n, s_max), dtype=torch.long)
        for r, s in enumerate(sufs):
            sl = slice(s_max - len(s), s_max) if e.padding_side == "left" else slice(0, len(s))
            ids[r, sl] = torch.tensor(s)
            smask[r, sl] = 1
        pmask = torch.zeros((n, p_max), dtype=torch.long)
        for r, p in enumerate(plens):
            pmask[r, :p] = 1  # a shorter prefix is right-padded inside the cache, masked out
        one_group = len({gi for gi, _ in part}) == 1
        layers = []
        for layer in range(len(caches[part[0][0]])):
            if one_group:
                k, v = caches[part[0][0]][layer]
                layers.append((k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)))
                continue
            ks, vs = [], []
            for gi, _ in part:
                k, v = caches[gi][layer]
                pad = p_max - k.shape[2]
                ks.append(nn.functional.pad(k, (0, 0, 0, pad)) if pad else k)
                vs.append(nn.functional.pad(v, (0, 0, 0, pad)) if pad else v)
            layers.append((torch.cat(ks), torch.cat(vs)))
        positions = torch.tensor(plens)[:, None] + (smask.cumsum(-1) - 1).clamp(min=0)
        ids, smask, pmask, positions = (e.to_device(t) for t in (ids, smask, pmask, positions))
        with torch.inference_mode():
            cache = DynamicCache(layers, config=e.model.config)
            out = e.model.base_model(
                input_ids=ids,
                attention_mask=torch.cat([pmask, smask], dim=1),
                position_ids=positions,
                use_cache=True,
                **{_cache_kwarg(e.model.base_model): cache},
            )
            return e.scores(out, smask, [batch[i] for _, i in part])

    @staticmethod
    def _windows_cover(engine: PrefixHost) -> bool:
        """Sliding-window layers (Mistral: 4,096) keep only the last window of a cache: share only
        where no sequence can be longer than the window, so the window never drops a key."""
        from transformers import DynamicCache

        config = engine.heads.model.config
        if not any(DynamicCache(config=config).is_sliding):
            return True
        window = getattr(config, "sliding_window", None)
        return window is not None and engine.max_length <= window

    def _self_check(self) -> bool:
        """Refuse sharing where it would change rewards: one probe group, sharing on vs off."""
        e = self.heads
        vocab = int(getattr(e.model.config, "vocab_size", 0) or 0)
        if vocab < 8:
            return False
        base = [(7 * k + 3) % vocab for k in range(1, 41)]
        probe = [
            EncodedItem(base + [(11 * k + j) % vocab for k in range(1, 4 + j)], None, False, 0)
            for j in range(3)
        ]
        for p in probe:
            p.original_tokens = p.n_tokens
        try:
            want = torch.tensor([s.rewards for s in e.forward_padded(probe)])
            plan = [PrefixGroup(len(base), (0, 1, 2))]
            got_map = self._score_groups(probe, plan)
            got = torch.tensor([got_map[i].rewards for i in range(3)])
        except Exception as exc:  # an architecture whose cache API differs: score without sharing
            log.warning(
                "prefix sharing disabled: %s does not take a shared cache (%s)", type(e.model).__name__, exc
            )
            return False
        tol = 1e-3 if e.weight.dtype == torch.float32 else 5e-2
        if not torch.allclose(got, want, atol=tol, rtol=tol):
            log.warning(
                "prefix sharing disabled: %s gives different rewards with a shared prefix (max diff %.3g)",
                type(e.model).__name__,
                (got - want).abs().max().item(),
            )
            return False
        return True
