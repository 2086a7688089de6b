"""Tokenizing is bounded work: pre-cut chat messages, a deadline that covers it, small requests first."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from model_store import ModelStore
from model_store.loader import load_reward_model
from scoring.engine import Item, ItemError, ScoringEngine
from scoring.settings import Settings
from tests.service.conftest import live_server, wait_until
from tests.service.test_app_load import in_background, post_concurrently

WORDS = "the a reward model scores each answer with several heads and we take the minimum of them".split()


class _Recording:
    """The engine's tokenizer, recording how many characters each call was handed."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.seen: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, text: str, *args: Any, **kwargs: Any) -> Any:
        self.seen.append(len(text) + sum(len(a) for a in args if isinstance(a, str)))
        return self._inner(text, *args, **kwargs)


@pytest.mark.parametrize("side", ["left", "right"])
def test_chat_messages_are_precut_and_keep_the_same_tokens(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch, side: str
) -> None:
    import model_store.tokenization as tokenization

    rm = load_reward_model(str(tiny_llama_dir), ModelStore(tmp_path / "s"))
    engine = ScoringEngine(rm, max_length=32, truncation_side=side)
    rng = random.Random(5)

    def big(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    limit = engine.items.precut_chars  # 32 * 64 characters
    conversations = [
        [{"role": "user", "content": big(3000)}, {"role": "assistant", "content": "short answer"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": big(3000)}],
        [{"role": "system", "content": big(800)}]
        + [{"role": r, "content": big(300)} for _ in range(6) for r in ("user", "assistant")],
    ]
    items = [Item(messages=m) for m in conversations]
    recorder = _Recording(engine.tokenizer)
    monkeypatch.setattr(engine.items, "tokenizer", recorder)
    cut = [engine.encode(it) for it in items]
    assert max(recorder.seen) <= limit + 2_000  # the template's own text on top of at most `limit`
    assert all(engine.items.chars(it) <= limit + 1_000 for it in items)  # the lane's cost estimate agrees
    monkeypatch.setattr(tokenization, "PRECUT_CHARS_PER_TOKEN", 10**9)  # no pre-cut: tokenize everything
    full = [engine.encode(it) for it in items]
    for a, b in zip(cut, full, strict=True):
        assert a.truncated and b.truncated
        assert a.input_ids == b.input_ids


class _SlowTokenizing:
    """A real engine whose tokenizing of long texts is slow (50 ms per item), like a huge conversation."""

    def __init__(self, inner: Any, release: threading.Event | None = None) -> None:
        self._inner = inner
        self.release = release

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def encode(self, item: Item) -> Any:
        if self.release is not None:
            self.release.wait(30)
        if item.text is not None and len(item.text) > 500:
            time.sleep(0.05)
        return self._inner.encode(item)


def test_deadline_holds_while_huge_requests_tokenize_and_small_ones_pass(tiny_engine) -> None:
    timeout_s = 1.5
    huge = {"query": [f"{i} " + "word " * 300 for i in range(60)]}  # 3 s of tokenizing each
    small = {"query": [f"short text {i}" for i in range(16)]}  # > 8 items: not tokenized inline
    with live_server(Settings(request_timeout_s=timeout_s), _SlowTokenizing(tiny_engine)) as live:
        start = time.monotonic()
        elapsed: dict[str, float] = {}

        def timed(name: str, body: dict) -> httpx.Response:
            r = httpx.post(f"{live.url}/get_reward", json=body, timeout=60)
            elapsed[name] = time.monotonic() - start
            return r

        threads = [in_background(timed, f"huge{i}", huge) for i in range(3)]
        wait_until(lambda: live.metric("hydra_rm_requests_arriving") >= 3, what="huge requests tokenizing")
        small_sent = time.monotonic() - start
        answer = timed("small", small)
        for t, _ in threads:
            t.join(60)
    assert answer.status_code == 200 and len(answer.json()["rewards"]) == 16
    assert elapsed["small"] - small_sent < 1.0, elapsed  # not queued behind the huge ones
    for i, (_, box) in enumerate(threads):
        r = box["result"]
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout", r.text
        assert elapsed[f"huge{i}"] < timeout_s + 1.0, elapsed  # the deadline covers tokenizing


def test_tokenizer_backlog_is_bounded_by_characters(tiny_engine, monkeypatch) -> None:
    """Two large requests fit the request-count backlog but not the character budget: 503 at once."""
    import service.runtime as runtime

    monkeypatch.setattr(runtime, "TOKENIZER_BACKLOG_CHARS", 50_000, raising=False)
    release = threading.Event()
    big = {"query": [f"{i} " + "word " * 400 for i in range(20)]}  # ~40k characters
    with live_server(Settings(), _SlowTokenizing(tiny_engine, release)) as live:
        first_thread, first = in_background(post_concurrently, live.url, [("/get_reward", big)])
        wait_until(lambda: live.metric("hydra_rm_requests_arriving") == 1, what="first request tokenizing")
        try:
            second = httpx.post(f"{live.url}/get_reward", json=big, timeout=3)
        finally:
            release.set()
        first_thread.join(60)
    assert second.status_code == 503 and second.headers["Retry-After"]
    assert "characters" in second.json()["error"]["message"]
    assert first["result"][0].status_code == 200 and len(first["result"][0].json()["rewards"]) == 20


def test_reject_policy_counts_huge_items_without_tokenizing_them_whole(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import model_store.tokenization as tokenization

    rm = load_reward_model(str(tiny_llama_dir), ModelStore(tmp_path / "s"))
    engine = ScoringEngine(rm, max_length=16, truncation_side="reject")
    recorder = _Recording(engine.tokenizer)
    monkeypatch.setattr(engine.items, "tokenizer", recorder)
    huge = [
        Item(text="word " * 100_000),
        Item(prompt="q", response="word " * 100_000),
        Item(messages=[{"role": "user", "content": "word " * 100_000}]),
    ]
    for item in huge:
        with pytest.raises(ItemError) as ei:
            engine.encode(item)
        assert ei.value.field == item.main_field and "max_length=16" in str(ei.value)
    assert max(recorder.seen) <= engine.items.precut_chars + 2_000
    # Where the pre-cut part fits (more characters per token than the cut assumes), all of it is counted.
    monkeypatch.setattr(tokenization, "PRECUT_CHARS_PER_TOKEN", 1)  # cut at 16 characters
    fits = Item(text="a b c d e f g h i")  # 17 characters, ~10 tokens
    assert engine.encode(fits).input_ids == engine.items.tokenize(fits, precut=False)[0]
    with pytest.raises(ItemError, match="max_length=16"):
        engine.encode(Item(text="a b c d e f g h i j k l m n o p q r s t"))
