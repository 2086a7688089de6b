"""veRL adapter: point `reward.custom_reward_function` at this module (README, "veRL").

veRL's reward managers call `compute_score(data_source=, solution_str=, ground_truth=, extra_info=)`
once per sample: the async form is awaited on the reward loop, the sync form runs in an executor
thread (verl/experimental/reward_loop/reward_manager/naive.py). The solution string is only the
response, so the prompt is read from `extra_info` when the dataset put it there. A dict result becomes
veRL's `reward_extra_info`, whose keys are read from the first sample and then looked up in every
sample: so every call returns the same keys. veRL can load this file by path (spec_from_file_location),
so imports here are absolute.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from client._client import AsyncHydraClient, HydraClient
from client.results import Score, ScoreList

URL_ENV = "HYDRA_RM_URL"
API_KEY_ENV = "HYDRA_RM_API_KEY"
AGGREGATION_ENV = "HYDRA_RM_AGGREGATION"  # the same name the server reads for its default
# Where datasets keep the prompt: veRL's own preprocessors store `question` (gsm8k, math); ours `prompt`.
PROMPT_KEYS = ("prompt", "question", "query", "problem")

_sync_clients: dict[tuple[str, str | None], HydraClient] = {}
_sync_lock = threading.Lock()
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, AsyncHydraClient]] = (
    weakref.WeakKeyDictionary()
)


def _config(kwargs: Mapping[str, Any]) -> tuple[str, str | None, str | None]:
    """URL, API key and aggregation: from `reward_kwargs` in the veRL config when given there, else the
    environment (the trainer's Ray workers inherit it via `runtime_env`)."""
    url = kwargs.get("url") or os.environ.get(URL_ENV)
    if not url:
        raise ValueError(f"set ${URL_ENV} (or reward_kwargs.url) to the hydra-rm server URL")
    api_key = kwargs.get("api_key") or os.environ.get(API_KEY_ENV)
    aggregation = kwargs.get("aggregation") or os.environ.get(AGGREGATION_ENV)
    return str(url), api_key, aggregation


def to_item(solution_str: str, extra_info: Mapping[str, Any] | None) -> dict[str, Any]:
    """The prompt from `extra_info` when present (text, or a chat message list), else the bare response."""
    for key in PROMPT_KEYS:
        prompt = (extra_info or {}).get(key)
        if isinstance(prompt, str) and prompt:
            return {"prompt": prompt, "response": solution_str}
        if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
            return {"messages": [*messages, {"role": "assistant", "content": solution_str}]}
    return {"text": solution_str}


def to_result(score: Score, head_names: Sequence[str]) -> dict[str, float]:
    """`score` plus the same extra keys for every sample (veRL indexes them by the first sample's keys)."""
    out = {
        "score": score.reward,
        "reward_min": score.min,
        "reward_max": score.max,
        "reward_mean": score.mean,
        "reward_std": score.std,
    }
    for name, key in zip(head_names, head_keys(head_names), strict=True):
        out[key] = score.heads[name]
    if score.novelty is not None:  # one served model: every sample has it, or none does
        out["novelty"] = score.novelty
        if score.novelty_percentile is not None:
            out["novelty_percentile"] = score.novelty_percentile
    return out


def head_keys(head_names: Sequence[str]) -> list[str]:
    """veRL keys for the heads: `head_<name>`, or the name itself when it already starts with `head_`
    (a model without head names has `head_0..`, which became `head_head_0`), unless that would make
    two keys equal (`x` and `head_x`): then every head keeps the prefix."""
    keys = [n if n.startswith("head_") else f"head_{n}" for n in head_names]
    return keys if len(set(keys)) == len(keys) else [f"head_{n}" for n in head_names]


def _results(scores: ScoreList) -> list[dict[str, float]]:
    return [to_result(s, scores.head_names) for s in scores]


def _sync_client(url: str, api_key: str | None) -> HydraClient:
    with _sync_lock:  # veRL calls the sync form from several executor threads at once
        client = _sync_clients.get((url, api_key))
        if client is None:
            client = _sync_clients[(url, api_key)] = HydraClient(url, api_key=api_key)
        return client


def _async_client(url: str, api_key: str | None) -> AsyncHydraClient:
    loop = asyncio.get_running_loop()  # httpx's async connections belong to one loop
    per_loop = _async_clients.setdefault(loop, {})
    client = per_loop.get((url, api_key))
    if client is None:
        client = per_loop[(url, api_key)] = AsyncHydraClient(url, api_key=api_key)
    return client


def compute_score(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """One sample, blocking (veRL runs it in a thread). Raises after the client's retries."""
    url, api_key, aggregation = _config(kwargs)
    scores = _sync_client(url, api_key).score([to_item(solution_str, extra_info)], aggregation=aggregation)
    return _results(scores)[0]


async def compute_score_async(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """One sample, awaited on veRL's reward loop (`reward.custom_reward_function.name=compute_score_async`)."""
    url, api_key, aggregation = _config(kwargs)
    client = _async_client(url, api_key)
    scores = await client.score([to_item(solution_str, extra_info)], aggregation=aggregation)
    return _results(scores)[0]


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Mapping[str, Any] | None],
    **kwargs: Any,
) -> list[dict[str, float]]:
    """The whole batch in one call, for veRL's `batch` reward manager (fewer, larger requests)."""
    url, api_key, aggregation = _config(kwargs)
    infos = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
    items = [to_item(s, e) for s, e in zip(solution_strs, infos, strict=True)]
    return _results(_sync_client(url, api_key).score(items, aggregation=aggregation))
