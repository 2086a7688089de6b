"""client.verl called the way veRL's reward managers call a custom reward function (veRL not installed)."""

from __future__ import annotations

import asyncio
import functools
import inspect

import pytest

from client import verl
from tests.client.conftest import reference

QUESTIONS = ["What is 2 + 2?", "Name a prime.", "Capital of France?", "Spell cat.", "Count to 3.", "Hi!"]
ANSWERS = ["4", "7 is prime", "Paris", "c-a-t", "1 2 3", "Hello, how can I help?"]


def _verl_args(i: int) -> dict:
    """The keywords veRL's NaiveRewardManager.run_single passes (extra_info from the gsm8k preprocessor
    plus the two keys the manager adds)."""
    return {
        "data_source": "openai/gsm8k",
        "solution_str": ANSWERS[i],
        "ground_truth": "unused",
        "extra_info": {
            "split": "train",
            "index": i,
            "answer": "#### 4",
            "question": QUESTIONS[i],
            "num_turns": None,
            "rollout_reward_scores": {},
        },
    }


def _wrap(raw_fn, reward_kwargs):
    """verl.trainer.ppo.reward.get_custom_reward_fn: a partial merging config reward_kwargs."""

    def call(raw, extra, *args, **kwargs):
        return raw(*args, **{**kwargs, **extra})

    async def call_async(raw, extra, *args, **kwargs):
        return await raw(*args, **{**kwargs, **extra})

    if inspect.iscoroutinefunction(raw_fn):
        return functools.partial(call_async, raw_fn, reward_kwargs)
    return functools.partial(call, raw_fn, reward_kwargs)


def _extra_keys_like_verl(results: list[dict]) -> dict[str, list[float]]:
    """RewardLoopWorker: keys from the first sample, then info[key] for every sample (KeyError if absent)."""
    keys = list(results[0].keys())
    return {k: [r[k] for r in results] for k in keys}


def _expected(tiny_engine, aggregation="min"):
    items = [{"prompt": q, "response": a} for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    return reference(tiny_engine, items, aggregation)


async def test_sync_and_async_forms_give_the_service_rewards_with_identical_keys(
    server, tiny_engine, monkeypatch
):
    monkeypatch.setenv("HYDRA_RM_URL", server.url)
    sync_fn, async_fn = _wrap(verl.compute_score, {}), _wrap(verl.compute_score_async, {})
    assert inspect.iscoroutinefunction(async_fn) and not inspect.iscoroutinefunction(sync_fn)
    loop = asyncio.get_running_loop()
    # veRL: sync functions in the default executor, async ones awaited, every sample concurrently.
    sync_results = await asyncio.gather(
        *(loop.run_in_executor(None, lambda i=i: sync_fn(**_verl_args(i))) for i in range(len(QUESTIONS)))
    )
    async_results = await asyncio.gather(*(async_fn(**_verl_args(i)) for i in range(len(QUESTIONS))))
    expected = _expected(tiny_engine)
    heads = [f"head_{n}" for n in tiny_engine.head_names]
    for results in (sync_results, async_results):
        assert all(set(r) == set(results[0]) for r in results)
        assert set(results[0]) == {"score", "reward_min", "reward_max", "reward_mean", "reward_std", *heads}
        extra = _extra_keys_like_verl(results)
        assert extra["score"] == pytest.approx([e["reward"] for e in expected], abs=1e-5)
        assert extra["reward_min"] == extra["score"]
        for k, key in enumerate(heads):
            assert extra[key] == pytest.approx([e["heads"][k] for e in expected], abs=1e-5)


def test_reward_kwargs_from_the_config_override_the_environment(server, tiny_engine, monkeypatch):
    monkeypatch.delenv("HYDRA_RM_URL", raising=False)
    with pytest.raises(ValueError, match="HYDRA_RM_URL"):
        verl.compute_score(**_verl_args(0))
    fn = _wrap(verl.compute_score, {"url": server.url, "aggregation": "mean"})
    out = fn(**_verl_args(1))
    assert out["score"] == pytest.approx(_expected(tiny_engine, "mean")[1]["reward"], abs=1e-5)


def test_batch_form_and_prompt_forms(server, tiny_engine, monkeypatch):
    monkeypatch.setenv("HYDRA_RM_URL", server.url)
    args = [_verl_args(i) for i in range(len(QUESTIONS))]
    out = verl.compute_score_batch(
        data_sources=[a["data_source"] for a in args],
        solution_strs=[a["solution_str"] for a in args],
        ground_truths=[a["ground_truth"] for a in args],
        extra_infos=[a["extra_info"] for a in args],
    )
    assert [o["score"] for o in out] == pytest.approx([e["reward"] for e in _expected(tiny_engine)], abs=1e-5)
    chat = [{"role": "user", "content": "Hi!"}]
    assert verl.to_item("Hello", {"prompt": chat}) == {
        "messages": [*chat, {"role": "assistant", "content": "Hello"}]
    }
    assert verl.to_item("Hello", None) == {"text": "Hello"}
    no_prompt = verl.compute_score("src", "just a response", None, None)
    assert no_prompt["score"] == pytest.approx(
        reference(tiny_engine, ["just a response"])[0]["reward"], abs=1e-5
    )


def _fake_score(heads: dict[str, float]):  # noqa: ANN202 - a stand-in for client.results.Score
    from types import SimpleNamespace

    values = list(heads.values())
    return SimpleNamespace(
        reward=min(values),
        min=min(values),
        max=max(values),
        mean=sum(values) / len(values),
        std=0.0,
        heads=heads,
        novelty=None,  # a model without the novelty statistic
        novelty_percentile=None,
    )


def test_default_head_names_are_not_prefixed_twice():
    """A model without head names has heads `head_0..`: veRL got `head_head_0`."""
    out = verl.to_result(_fake_score({"head_0": 1.0, "head_1": 2.0}), ["head_0", "head_1"])
    assert out["head_0"] == 1.0 and out["head_1"] == 2.0 and not any(k.startswith("head_head") for k in out)
    named = verl.to_result(_fake_score({"helpful": 1.0, "honest": 2.0}), ["helpful", "honest"])
    assert named["head_helpful"] == 1.0 and named["head_honest"] == 2.0
    # `x` and `head_x` would both become head_x: then every key keeps the prefix, so none collide
    both = verl.to_result(_fake_score({"x": 1.0, "head_x": 2.0}), ["x", "head_x"])
    assert both["head_x"] == 1.0 and both["head_head_x"] == 2.0
