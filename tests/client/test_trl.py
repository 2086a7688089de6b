"""TRL's own GRPOTrainer trains against a running hydra-rm through HydraReward."""

from __future__ import annotations

import pickle
from statistics import fmean
from typing import Any

import pytest

from client.trl import HydraReward, to_item
from tests.client.conftest import reference

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
# TRL 1.16 itself calls transformers' renamed is_gradient_checkpointing; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

PROMPTS = ["Write a haiku about rain.", "What is 2 + 2?", "Name a colour.", "Say hello."]


class Recording(HydraReward):
    """The adapter under test, remembering what TRL passed and what it returned."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list[Any], list[Any], list[float | None]]] = []

    async def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        assert "log_metric" in kwargs and "log_extra" in kwargs and "trainer_state" in kwargs
        out = await super().__call__(prompts, completions, completion_ids, **kwargs)
        self.calls.append((list(prompts), list(completions), out))
        return out


def _policy(tiny_llama_dir):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)  # the reward model's tokenizer has a chat template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    return LlamaForCausalLM(config), tok


def _trainer(tiny_llama_dir, tmp_path, reward_funcs, dataset, **config):
    model, tok = _policy(tiny_llama_dir)
    # The settings that run on a CPU (DESIGN.md "TRL and Ray on this machine"); beta=0 skips the
    # reference model, which TRL would rebuild from a saved path.
    settings: dict[str, Any] = dict(
        output_dir=str(tmp_path / "grpo"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-4,
        use_cpu=True,
        bf16=False,
        beta=0.0,
        activation_checkpointing=False,  # TRL defaults to True (gradient_checkpointing, renamed in transformers 5)
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    args = trl.GRPOConfig(**{**settings, **config})
    return trl.GRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset, processing_class=tok
    )


def test_grpo_trains_two_steps_with_hydra_rewards_and_per_head_metrics(
    server, tiny_engine, tiny_llama_dir, tmp_path
):
    reward = Recording(server.url)
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS * 2})
    trainer = _trainer(tiny_llama_dir, tmp_path, [reward], dataset)
    trainer.train()
    assert trainer.state.global_step == 2
    steps = [h for h in trainer.state.log_history if "rewards/hydra_rm/mean" in h]
    assert len(steps) == 2 and len(reward.calls) == 2
    for (prompts, completions, returned), logged in zip(reward.calls, steps, strict=True):
        items = [to_item(p, c) for p, c in zip(prompts, completions, strict=True)]
        expected = reference(tiny_engine, items, "min")
        assert returned == pytest.approx([e["reward"] for e in expected], abs=1e-5)  # the service's min
        assert logged["rewards/hydra_rm/mean"] == pytest.approx(
            fmean(e["reward"] for e in expected), abs=1e-5
        )
        for k, head in enumerate(tiny_engine.head_names):  # per-head means in TRL's own metrics
            assert logged[f"hydra/{head}"] == pytest.approx(fmean(e["heads"][k] for e in expected), abs=1e-5)
        assert logged["hydra/head_std"] > 0 and logged["hydra/min_mean_gap"] > 0
    assert len(trainer._logs["extra"]["hydra/std"]) == len(reward.calls[-1][1])  # per-sample std column


def test_conversational_per_head_functions_share_one_request(server, tiny_engine, tiny_llama_dir, tmp_path):
    parent = HydraReward(server.url)
    heads = parent.head_rewards()
    assert [h.__name__ for h in heads] == [f"hydra_{n}" for n in tiny_engine.head_names]
    dataset = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS * 2]})
    trainer = _trainer(
        tiny_llama_dir,
        tmp_path,
        heads,
        dataset,
        multi_objective_aggregation="normalize_then_sum",
        max_steps=1,
    )
    before = server.metric("hydra_rm_requests_total", {"endpoint": "/v1/score"})
    trainer.train()
    assert server.metric("hydra_rm_requests_total", {"endpoint": "/v1/score"}) - before == 1  # not K requests
    logged = next(h for h in trainer.state.log_history if "rewards/hydra_helpful/mean" in h)
    prompts, completions = list(trainer._logs["prompt"]), list(trainer._logs["completion"])
    assert isinstance(completions[0], list) and completions[0][0]["role"] == "assistant"
    expected = reference(tiny_engine, [to_item(p, c) for p, c in zip(prompts, completions, strict=True)])
    for k, head in enumerate(tiny_engine.head_names):
        assert logged[f"rewards/hydra_{head}/mean"] == pytest.approx(
            fmean(e["heads"][k] for e in expected), abs=1e-5
        )


async def test_picklable_and_usable_after_unpickling(server, tiny_engine):
    reward = pickle.loads(pickle.dumps(HydraReward(server.url, aggregation="mean")))
    heads = pickle.loads(pickle.dumps(reward.head_rewards(["helpful"])))
    out = await reward(["Hi"], ["Hello there"])
    expected = reference(tiny_engine, [{"prompt": "Hi", "response": "Hello there"}], "mean")
    assert out == pytest.approx([expected[0]["reward"]], abs=1e-5)
    assert await heads[0](["Hi"], ["Hello there"]) == pytest.approx([expected[0]["heads"][0]], abs=1e-5)


async def test_reward_from_env(server, tiny_engine, monkeypatch):
    import client.trl as mod

    monkeypatch.setenv("HYDRA_RM_URL", server.url + "/get_reward")  # OpenRLHF-style value works too
    monkeypatch.setattr(mod, "_from_env", None)
    out = await mod.reward(prompts=["Hi"], completions=["Hello"], completion_ids=[[1]], extra_column=["x"])
    assert out == pytest.approx(
        [reference(tiny_engine, [{"prompt": "Hi", "response": "Hello"}])[0]["reward"]], abs=1e-5
    )
    monkeypatch.delenv("HYDRA_RM_URL")
    with pytest.raises(ValueError, match="HYDRA_RM_URL"):
        HydraReward()


def test_trl_cli_resolves_the_module_level_reward():
    """`trl grpo --reward_funcs client.trl.reward` imports the dotted path (trl/scripts/grpo.py) and
    runs it as an async reward function under the name TRL logs."""
    import importlib

    from trl.trainer.utils import get_callable_name, is_async_callable

    module_path, name = "client.trl.reward".rsplit(".", 1)
    func = getattr(importlib.import_module(module_path), name)
    assert is_async_callable(func) and get_callable_name(func) == "reward"
    assert (
        is_async_callable(HydraReward("http://x"))
        and get_callable_name(HydraReward("http://x")) == "hydra_rm"
    )
