"""Shared-prefix scoring must not change a reward: sharing on == sharing off == HF's own logits."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from model_store import ModelStore
from model_store.loader import load_reward_model
from model_store.tokenization import EncodedItem, Item
from scoring.batching import BatchPolicy, PrefixGroup, plan_prefix_groups, plan_shared_batches
from scoring.engine import ScoringEngine
from scoring.prefix import PrefixCache, PrefixScorer, is_causal_decoder
from service.batcher import Batcher
from tests.builders import build_tiny_decoder

ATOL = 1e-5


@pytest.fixture(scope="module")
def model_dirs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prefix-models")
    return {
        "llama": tiny_llama_dir,
        "qwen2": build_tiny_decoder(root / "qwen2", "qwen2"),
        "gpt2": build_tiny_decoder(root / "gpt2", "gpt2"),
    }


_ENGINES: dict[tuple[str, str], ScoringEngine] = {}


def _engine(model_dirs: dict[str, Path], arch: str, side: str, tmp_path: Path) -> ScoringEngine:
    if (arch, side) not in _ENGINES:
        rm = load_reward_model(str(model_dirs[arch]), ModelStore(tmp_path / "store"))
        _ENGINES[arch, side] = ScoringEngine(rm, padding_side=side)  # type: ignore[arg-type]
    return _ENGINES[arch, side]


def _hf_alone(path: Path, items: list[EncodedItem]) -> torch.Tensor:
    """The reference: the HF model's own forward on each full sequence alone (no padding, no cache)."""
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in items])


def _enc(ids: list[int]) -> EncodedItem:
    return EncodedItem(list(ids), None, False, len(ids))


def _workload(vocab: int, seed: int) -> list[EncodedItem]:
    """Three groups of 2-5 (prompts 40-90 tokens, suffixes 1-30), singletons, a duplicate; shuffled."""
    rng = random.Random(seed)
    items = []
    for _ in range(3):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(40, 90))]
        for _ in range(rng.randint(2, 5)):
            items.append(_enc(prompt + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))]))
    items += [_enc([rng.randrange(3, vocab) for _ in range(rng.randint(5, 60))]) for _ in range(3)]
    items.append(_enc(items[0].input_ids))
    rng.shuffle(items)
    return items


def _started_batcher(scorer: PrefixScorer) -> Batcher:
    """A batcher over `scorer` with room for everything these tests send at once."""
    b = Batcher(
        scorer.forward,
        BatchPolicy(100_000, 64, 10.0),
        max_queue_items=100,
        max_queue_tokens=100_000,
        max_wait_s=0.05,
    )
    b.start()
    return b


def _rewards(scores: list) -> torch.Tensor:
    return torch.tensor([s.rewards for s in scores])


# -- planning (pure) --------------------------------------------------------------------------------


def test_plan_groups_shared_runs_and_keeps_a_token_of_each_item() -> None:
    p = list(range(100, 150))  # 50 shared tokens
    seqs = [p + [1, 2], p + [3], p, list(range(40)), p[:20] + [9] * 40]
    plan = plan_prefix_groups(seqs, min_shared=32)
    assert plan.groups == [PrefixGroup(49, (0, 1, 2))]  # seqs[2] is the prefix itself: one token kept
    assert plan.singles == [3, 4]  # shares only 20 tokens with the others: under min_shared
    assert plan.source == [0, 1, 2, 3, 4]
    assert plan.tokens_saved == 2 * 49
    assert plan.tokens_computed == sum(map(len, seqs)) - 2 * 49


def test_plan_needs_min_shared_and_two_items() -> None:
    p = list(range(31))
    assert plan_prefix_groups([p + [1], p + [2]], min_shared=32).groups == []
    assert plan_prefix_groups([p + [1, 5], p + [1, 6]], min_shared=32).groups == [PrefixGroup(32, (0, 1))]
    assert plan_prefix_groups([list(range(200))], min_shared=32).groups == []


def test_plan_collapses_duplicates_even_with_sharing_off() -> None:
    a, b = list(range(10)), list(range(5, 20))
    plan = plan_prefix_groups([a, b, a, a, b], min_shared=None)
    assert plan.source == [0, 1, 0, 0, 1]
    assert plan.groups == [] and plan.singles == [0, 1]
    assert plan.tokens_computed == 25 and plan.shared_items == 3


def test_plan_prefers_long_group_prefixes_over_one_short_common_run() -> None:
    """A 40-token system prompt shared by all must not swallow two groups that each share 300."""
    rng = random.Random(0)
    system = [7] * 40
    seqs = []
    for g in range(2):
        prompt = system + [1000 + g] + [rng.randrange(50) for _ in range(299)]
        seqs += [prompt + [rng.randrange(50) for _ in range(10)] for _ in range(4)]
    plan = plan_prefix_groups(seqs, min_shared=32)
    assert sorted(g.members for g in plan.groups) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert all(g.prefix_len >= 340 for g in plan.groups)


@pytest.mark.parametrize("seed", range(5))
def test_plan_invariants_on_random_windows(seed: int) -> None:
    rng = random.Random(seed)
    roots = [[rng.randrange(4) for _ in range(rng.randint(0, 80))] for _ in range(4)]
    seqs = [rng.choice(roots) + [rng.randrange(4) for _ in range(rng.randint(0, 40))] for _ in range(40)]
    seqs = [s or [1] for s in seqs]
    plan = plan_prefix_groups(seqs, min_shared=16)
    reps = [i for i, s in enumerate(plan.source) if s == i]
    placed = sorted([*plan.singles, *(i for g in plan.groups for i in g.members)])
    assert placed == reps  # every distinct sequence scored exactly once
    for i, s in enumerate(plan.source):
        assert seqs[i] == seqs[s]
    saved = 0
    for g in plan.groups:
        assert len(g.members) >= 2 and g.prefix_len >= 16
        head = seqs[g.members[0]][: g.prefix_len]
        assert all(seqs[i][: g.prefix_len] == head and len(seqs[i]) > g.prefix_len for i in g.members)
        saved += (len(g.members) - 1) * g.prefix_len
    dup_tokens = sum(len(seqs[i]) for i, s in enumerate(plan.source) if s != i)
    assert plan.tokens_saved == saved + dup_tokens


def test_batches_keep_a_group_together_within_the_budget() -> None:
    rng = random.Random(1)
    prompts = [[rng.randrange(100) for _ in range(100)] for _ in range(3)]
    seqs = []
    for k in range(24):  # three interleaved groups of 8, arriving one request at a time
        seqs.append(prompts[k % 3] + [rng.randrange(100) for _ in range(rng.randint(5, 40))])
    seqs += [[rng.randrange(100) for _ in range(rng.randint(5, 50))] for _ in range(6)]
    seqs.append(list(seqs[4]))  # a duplicate rides with its original
    batches = plan_shared_batches(seqs, token_budget=500, max_batch_size=64, max_padding=0.1)
    assert sorted(i for b in batches for i in b) == list(range(len(seqs)))
    assert [b[0] for b in batches] == sorted(b[0] for b in batches)  # first-come first-served
    for g in range(3):
        assert sum(any(i < 24 and i % 3 == g for i in b) for b in batches) == 1  # 100 + 8 x <=40 fits
    assert any(4 in b and 30 in b for b in batches)
    for b in batches:
        if all(i >= 24 for i in b):  # singletons as without sharing: budget and padding cap
            lens = [len(seqs[i]) for i in b]
            assert max(lens) * len(lens) <= 500 and max(lens) * len(lens) <= 1.1 * sum(lens) + 1e-9
    tight = plan_shared_batches(seqs[:24], token_budget=150, max_batch_size=3)
    for b in tight:  # over the budget: a group straddles batches, each within budget and size
        assert len(b) <= 3 and 100 + sum(len(seqs[i]) - 100 for i in b) <= 150
    assert len(tight) > 3


# -- execution: exact against the model's own logits ----------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_sharing_on_equals_off_equals_hf(
    model_dirs: dict[str, Path], tmp_path: Path, arch: str, side: str
) -> None:
    engine = _engine(model_dirs, arch, side, tmp_path)
    items = _workload(
        engine.model.config.vocab_size, seed=["llama", "qwen2", "gpt2"].index(arch) * 2 + (side == "left")
    )
    on = PrefixScorer(engine, max_padding=0.3)
    assert on.sharing
    got_on = on.forward(items)
    plan = on.stats.last
    assert plan is not None and len(plan.groups) == 3 and plan.singles and plan.tokens_saved > 100
    got_off = engine.forward_padded(items)
    ref = _hf_alone(model_dirs[arch], items)
    torch.testing.assert_close(_rewards(got_on), ref, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(_rewards(got_off), ref, atol=ATOL, rtol=ATOL)
    assert [s.tokens for s in got_on] == [e.n_tokens for e in items]


@pytest.mark.parametrize("mode", ["one", "group_padded", "group_sorted", "cross_sorted"])
def test_every_suffix_batching_is_exact(model_dirs: dict[str, Path], tmp_path: Path, mode: str) -> None:
    """The cross-group mode pads shorter prefixes inside the cache: the mask must hide them."""
    engine = _engine(model_dirs, "gpt2", "left", tmp_path)
    items = _workload(engine.model.config.vocab_size, seed=7)
    got = PrefixScorer(engine, suffix_batching=mode, max_padding=10.0).forward(items)  # type: ignore[arg-type]
    torch.testing.assert_close(_rewards(got), _hf_alone(model_dirs["gpt2"], items), atol=ATOL, rtol=ATOL)


def test_gpt2_positions_continue_after_the_prefix(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Learned absolute positions: a suffix restarted at position 0 would give a different reward."""
    engine = _engine(model_dirs, "gpt2", "right", tmp_path)
    rng = random.Random(3)
    prompt = [rng.randrange(3, 500) for _ in range(60)]
    items = [_enc(prompt + [rng.randrange(3, 500) for _ in range(n)]) for n in (3, 17)]
    got = PrefixScorer(engine).forward(items)
    torch.testing.assert_close(_rewards(got), _hf_alone(model_dirs["gpt2"], items), atol=ATOL, rtol=ATOL)
    alone = _hf_alone(model_dirs["gpt2"], [_enc(e.input_ids[60:]) for e in items])
    assert (alone - _rewards(got)).abs().max() > 1e-3  # the check above could fail


def test_tokenizer_seam_shares_only_the_identical_run(
    tiny_engine: ScoringEngine, tiny_llama_dir: Path
) -> None:
    """The prompt's last word merges with each response's first: share what is identical, no more."""
    prompt = (
        "A reward model scores each answer with several heads, and we take the minimum of them to be "
        "safe, because one head alone can be fooled by a long answer. The rew"
    )
    responses = ["ard model is good", "ards are fine here", "rite is better", "ard"]
    items = [tiny_engine.encode(Item(text=prompt + r)) for r in responses]
    alone = tiny_engine.encode(Item(text=prompt)).input_ids
    assert any(e.input_ids[: len(alone)] != alone for e in items)  # the seam really merges
    scorer = PrefixScorer(tiny_engine)
    got = scorer.forward(items)
    plan = scorer.stats.last
    assert plan is not None and plan.groups
    for g in plan.groups:
        head = items[g.members[0]].input_ids[: g.prefix_len]
        assert all(items[i].input_ids[: g.prefix_len] == head for i in g.members)
    torch.testing.assert_close(_rewards(got), _hf_alone(tiny_llama_dir, items), atol=ATOL, rtol=ATOL)


def test_duplicates_fan_out_in_order_as_own_copies(tiny_engine: ScoringEngine, tiny_llama_dir: Path) -> None:
    rng = random.Random(5)
    a, b = ([rng.randrange(3, 500) for _ in range(n)] for n in (12, 50))
    items = [_enc(a), _enc(b), _enc(a), EncodedItem(list(a), None, True, 99), _enc(b)]
    scorer = PrefixScorer(tiny_engine)
    got = scorer.forward(items)
    assert scorer.stats.last is not None and scorer.stats.last.tokens_computed == 62
    torch.testing.assert_close(_rewards(got), _hf_alone(tiny_llama_dir, items), atol=ATOL, rtol=ATOL)
    assert got[0].rewards == got[2].rewards and got[0].rewards is not got[2].rewards
    assert [s.truncated for s in got] == [False, False, False, True, False]  # each item's own flag


def test_encoders_never_share(tiny_bert_dir: Path, tmp_path: Path) -> None:
    rm = load_reward_model(str(tiny_bert_dir), ModelStore(tmp_path / "s"))
    engine = ScoringEngine(rm)
    assert not is_causal_decoder(engine.model)
    scorer = PrefixScorer(engine)
    assert not scorer.sharing
    long = " ".join(["the reward model scores each answer"] * 10)
    items = [engine.encode(Item(prompt=long, response=r)) for r in ("yes", "no", "yes")]
    got = scorer.forward(items)
    assert scorer.stats.last is not None and not scorer.stats.last.groups
    assert scorer.stats.last.source == [0, 1, 0]  # an exact duplicate is still scored once
    want = engine.forward_padded(items)
    torch.testing.assert_close(_rewards(got), _rewards(want), atol=ATOL, rtol=ATOL)


def test_self_check_refuses_sharing_that_changes_rewards(
    tiny_engine: ScoringEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = PrefixScorer._encode_prefix

    def shifted(self: PrefixScorer, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k + 0.5, v) for k, v in real(self, ids)]

    monkeypatch.setattr(PrefixScorer, "_encode_prefix", shifted)
    assert not PrefixScorer(tiny_engine).sharing


async def test_poison_item_inside_a_shared_group_fails_alone(
    tiny_engine: ScoringEngine, tiny_llama_dir: Path
) -> None:
    """One request per response, as OpenRLHF sends them; one suffix breaks the embedding lookup."""
    from service.errors import ScoringFailed

    rng = random.Random(11)
    prompt = [rng.randrange(3, 500) for _ in range(60)]
    items = [_enc(prompt + [rng.randrange(3, 500) for _ in range(rng.randint(2, 20))]) for _ in range(6)]
    poison = _enc(prompt + [tiny_engine.model.config.vocab_size + 5, 4])
    scorer = PrefixScorer(tiny_engine, max_padding=10.0)
    b = _started_batcher(scorer)
    jobs = [b.submit([e]) for e in items[:3]] + [b.submit([poison])] + [b.submit([e]) for e in items[3:]]
    results = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
    await b.close(1)
    assert isinstance(results[3], ScoringFailed)
    good = [r[0] for k, r in enumerate(results) if k != 3]
    torch.testing.assert_close(_rewards(good), _hf_alone(tiny_llama_dir, items), atol=ATOL, rtol=ATOL)
    assert scorer.stats.groups >= 2  # the halves that did not hold the poison still shared


def test_group_straddling_two_batches_scores_the_same(
    tiny_engine: ScoringEngine, tiny_llama_dir: Path
) -> None:
    rng = random.Random(13)
    prompt = [rng.randrange(3, 500) for _ in range(70)]
    items = [_enc(prompt + [rng.randrange(3, 500) for _ in range(rng.randint(2, 30))]) for _ in range(7)]
    batches = plan_shared_batches([e.input_ids for e in items], token_budget=160, max_batch_size=64)
    assert len(batches) >= 2 and all(len(b) >= 2 for b in batches), batches
    scorer = PrefixScorer(tiny_engine)
    got: dict[int, list[float]] = {}
    for b in batches:
        got.update(zip(b, (s.rewards for s in scorer.forward([items[i] for i in b])), strict=True))
    assert scorer.stats.groups == len(batches)
    assert scorer.stats.cache_hits == len(batches) - 1  # the prompt was encoded once, then reused
    want = _hf_alone(tiny_llama_dir, items)
    torch.testing.assert_close(torch.tensor([got[i] for i in range(7)]), want, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_later_batches_reuse_a_cached_prompt_exactly(
    model_dirs: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    """A GRPO group's later samples arriving one per batch (and a later group of two) run against the
    prompt cached by the first batch: same rewards as HF, the prompt's tokens not computed again."""
    engine = _engine(model_dirs, arch, "right", tmp_path)
    rng = random.Random(21)
    vocab = engine.model.config.vocab_size
    prompt = [rng.randrange(3, vocab) for _ in range(60)]
    items = [_enc(prompt + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 20))]) for _ in range(6)]
    other = _enc([rng.randrange(3, vocab) for _ in range(50)])
    scorer = PrefixScorer(engine)
    assert len(scorer.cache) == 0  # the self-check's probe is not kept
    got = [s.rewards for s in scorer.forward(items[:2])]  # a group: its prompt is encoded and cached
    assert len(scorer.cache) == 1
    saved = scorer.stats.tokens_saved
    got += [s.rewards for s in scorer.forward([items[2], other])]  # a single hit beside a stranger
    assert scorer.stats.tokens_saved - saved >= 60
    got.append(scorer.forward([other])[0].rewards)  # nothing cached for it
    got += [s.rewards for s in scorer.forward(items[3:])]  # a group of three, its prompt from the cache
    assert scorer.stats.cache_hits >= 1
    want = _hf_alone(model_dirs[arch], [*items[:3], other, other, *items[3:]])
    torch.testing.assert_close(torch.tensor(got), want, atol=ATOL, rtol=ATOL)


def test_prefix_cache_finds_the_longest_prompt_and_stays_within_its_bytes() -> None:
    kv = [(torch.zeros(1, 1, 10, 4), torch.zeros(1, 1, 10, 4))]  # 320 bytes per entry
    cache = PrefixCache(max_bytes=700, min_shared=2)
    a, b = [1, 2, 3], [1, 2, 3, 4, 5]
    cache.put(a, kv)
    cache.put(b, kv)
    assert cache.find([1, 2, 3, 4, 5, 6])[0] == 5  # type: ignore[index]
    assert cache.find([1, 2, 3, 4, 5])[0] == 3  # type: ignore[index]  # an item keeps a token of its own
    assert cache.find([1, 2, 3, 4, 5, 6], longest=4)[0] == 3  # type: ignore[index]
    assert cache.find([1, 9, 3, 4]) is None and cache.find([1, 2, 9]) is None
    cache.find([1, 2, 3, 7])  # `a` is now the most recently used
    cache.put([7, 7, 7], kv)  # over 700 bytes: the least recently used (`b`) goes
    assert len(cache) == 2 and cache.bytes == 640
    assert cache.find([1, 2, 3, 4, 5, 6])[0] == 3  # type: ignore[index]
    cache.put([8, 8], [(torch.zeros(1, 1, 100, 4), torch.zeros(1, 1, 100, 4))])  # alone over the cap
    assert len(cache) == 2


async def test_duplicate_requests_each_get_their_own_results_in_order(tiny_engine: ScoringEngine) -> None:

    rng = random.Random(12)
    answers = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 9, 40)]
    requests = [[_enc(answers[(r + k) % 3]) for k in range(3)] for r in range(6)]
    scorer = PrefixScorer(tiny_engine)
    b = _started_batcher(scorer)
    jobs = [b.submit(req) for req in requests]
    results = await asyncio.gather(*(j.future for j in jobs))
    await b.close(1)
    want = {
        tuple(a): s.rewards
        for a, s in zip(answers, tiny_engine.forward([_enc(a) for a in answers]), strict=True)
    }
    for req, res in zip(requests, results, strict=True):
        assert [s.tokens for s in res] == [e.n_tokens for e in req]
        torch.testing.assert_close(
            _rewards(res), torch.tensor([want[tuple(e.input_ids)] for e in req]), atol=ATOL, rtol=ATOL
        )
    assert scorer.stats.tokens_saved >= 15 * 5  # 18 items, 3 distinct: most were never computed


# -- wiring: setting, engine, batcher window, batch job, metrics -----------------------------------


def test_setting_turns_sharing_off_and_encoders_plan_without_it(
    tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    from scoring.settings import Settings

    assert Settings().prefix_sharing == "auto" and Settings().batch_policy().prefix_sharing
    off_policy = Settings(prefix_sharing="off").batch_policy()
    assert not off_policy.prefix_sharing
    store = ModelStore(tmp_path / "s")
    off = ScoringEngine(load_reward_model(str(tiny_llama_dir), store), policy=off_policy)
    assert not off.prefix.enabled and not off.policy.prefix_sharing
    on = ScoringEngine(load_reward_model(str(tiny_llama_dir), store))
    assert on.prefix.sharing and on.policy.prefix_sharing
    bert = ScoringEngine(load_reward_model(str(tiny_bert_dir), store))
    assert bert.prefix.enabled and not bert.prefix.sharing and not bert.policy.prefix_sharing
    items = _workload(on.model.config.vocab_size, seed=21)
    torch.testing.assert_close(
        _rewards(on.score_encoded(items)), _rewards(off.score_encoded(items)), atol=ATOL, rtol=ATOL
    )
    assert on.prefix.stats.tokens_saved > 100 and off.prefix.stats.items == 0


async def test_a_group_arriving_as_separate_requests_lands_in_one_batch() -> None:
    """16 requests sharing a 1,000-token prompt: 16k raw tokens overflow a window of 8 x 1,100, but
    the prompt counted once (1,080) fits one batch; the window must not cut the group in two."""
    from scoring.results import ItemScore

    batches: list[int] = []

    def forward(batch: list[EncodedItem]) -> list[ItemScore]:
        batches.append(len(batch))
        return [ItemScore([0.0], 0.0, 0.0, 0.0, 0.0, e.n_tokens, False) for e in batch]

    prompt = list(range(1000))
    b = Batcher(
        forward, BatchPolicy(1100, 64, 0.1), max_queue_items=100, max_queue_tokens=10**6, max_wait_s=0.05
    )
    b.start()
    jobs = [b.submit([_enc(prompt + [k] * 5)]) for k in range(16)]
    await asyncio.gather(*(j.future for j in jobs))
    await b.close(1)
    assert batches == [16]


def test_batch_job_shares_and_writes_the_same_rewards(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import json

    from jobs.local import ScoreJob
    from scoring.settings import Settings

    rng = random.Random(8)
    words = "the reward model scores each answer with several heads and we take the minimum".split()
    lines = []
    for g in range(4):
        prompt = f"Question {g}: " + " ".join(rng.choice(words) for _ in range(40))
        for k in range(6):
            lines.append(
                {"id": f"{g}-{k}", "text": prompt + "\n" + " ".join(rng.choice(words) for _ in range(k + 2))}
            )
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    store = ModelStore(tmp_path / "s")
    outs = {}
    for mode in ("auto", "off"):
        engine = ScoringEngine(
            load_reward_model(str(tiny_llama_dir), store), policy=Settings(prefix_sharing=mode).batch_policy()
        )
        res = ScoreJob(engine, src, tmp_path / f"{mode}.jsonl", chunk_size=10).run(progress_bar=False)
        assert res.scored == len(lines) and res.errors == 0
        outs[mode] = [json.loads(x) for x in (tmp_path / f"{mode}.jsonl").read_text().splitlines()]
        if mode == "auto":
            assert engine.prefix.stats.groups >= 4  # chunks of 10 cut groups: each part still shares
    assert [r["id"] for r in outs["auto"]] == [x["id"] for x in lines]
    on = torch.tensor([list(r["heads"].values()) for r in outs["auto"]])
    off = torch.tensor([list(r["heads"].values()) for r in outs["off"]])
    torch.testing.assert_close(on, off, atol=ATOL, rtol=ATOL)


def test_service_counts_tokens_saved_and_shared_items(tiny_engine: ScoringEngine) -> None:
    from scoring.settings import Settings
    from tests.service.conftest import live_server

    prompt = "Tell me about reward models. " * 12
    items = [{"prompt": prompt, "response": f"answer number {k} " * (k + 1)} for k in range(6)]
    items.append(dict(items[0]))  # a duplicate
    with live_server(Settings(), tiny_engine) as live, live.client() as c:
        before = (
            live.metric("hydra_rm_prefix_tokens_saved_total"),
            live.metric("hydra_rm_prefix_shared_items_total"),
        )
        r = c.post("/v1/score", json={"items": items})
        assert r.status_code == 200, r.text
        saved = live.metric("hydra_rm_prefix_tokens_saved_total") - before[0]
        shared = live.metric("hydra_rm_prefix_shared_items_total") - before[1]
    encoded = [tiny_engine.encode(Item(prompt=it["prompt"], response=it["response"])) for it in items]
    plan = plan_prefix_groups([e.input_ids for e in encoded])
    assert plan.groups and saved == plan.tokens_saved and shared == plan.shared_items == 7
    want = tiny_engine.forward_padded(encoded)
    got = torch.tensor([list(x["heads"].values()) for x in r.json()["results"]])
    torch.testing.assert_close(got, _rewards(want), atol=ATOL, rtol=ATOL)


def test_plan_with_nothing_shared_is_the_identity_and_a_single_duplicate_is_still_found() -> None:
    rng = random.Random(3)
    seqs = [[rng.randrange(3, 500) for _ in range(rng.randint(5, 90))] for _ in range(40)]
    plan = plan_prefix_groups(seqs, min_shared=32)
    assert (plan.groups, plan.singles, plan.source) == ([], list(range(40)), list(range(40)))
    assert plan.tokens_saved == 0
    dup = plan_prefix_groups([*seqs, list(seqs[7])], min_shared=32)
    assert dup.source[40] == 7 and dup.tokens_saved == len(seqs[7])
    short = plan_prefix_groups([[1, 2, 3], [1, 2, 3], [1, 2]], min_shared=None)  # sharing off: dups only
    assert short.source == [0, 0, 2] and short.groups == []
