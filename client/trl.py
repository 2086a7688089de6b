"""TRL adapter: `GRPOTrainer(reward_funcs=[HydraReward("http://rm:8000")])`, or with no Python at all,
`HYDRA_RM_URL=http://rm:8000 trl grpo ... --reward_funcs client.trl.reward`.

TRL (1.16) calls every reward function with `prompts`, `completions`, `completion_ids`, the dataset's
columns, `trainer_state`, `log_metric` and `log_extra`, and runs async ones together on one long-lived
background loop (`asyncio.run_coroutine_threadsafe(..., trainer.async_loop)`): so the client here is
created lazily on that loop and reused, and nothing calls `asyncio.run`. TRL itself never retries and
never times out (a hung reward call stops training), which is why the client's retries matter here.
Importing this module does not import TRL.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from statistics import fmean
from typing import Any

from client._client import AsyncHydraClient, OnError
from client.results import Score, ScoreList

URL_ENV = "HYDRA_RM_URL"
API_KEY_ENV = "HYDRA_RM_API_KEY"


def to_item(prompt: Any, completion: Any) -> dict[str, Any]:
    """TRL's two formats: strings (prompt + completion, templated by the server), or conversational
    message lists, where the completion is `[{"role": "assistant", "content": ...}]`."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "response": completion}
    messages: list[dict[str, str]] = []
    for part, name in ((prompt, "prompt"), (completion, "completion")):
        if isinstance(part, str):
            role = "user" if name == "prompt" else "assistant"
            messages.append({"role": role, "content": part})
        elif isinstance(part, Sequence):
            messages.extend({"role": str(m["role"]), "content": _content(m["content"])} for m in part)
        else:
            raise TypeError(f"{name}: expected a string or a list of messages, got {type(part).__name__}")
    return {"messages": messages}


def _content(content: Any) -> str:
    # Multimodal TRL messages carry a list of parts; the reward model reads their text.
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return str(content)


class HydraReward:
    """One float per completion: the service's reward (its `min` over heads unless `aggregation` says
    otherwise). Per-head means and the head disagreement go to TRL's logged metrics (`hydra/<head>`,
    `hydra/head_std`, `hydra/min_mean_gap`; for models with a novelty statistic `hydra/novelty`,
    `hydra/novelty_percentile` and `hydra/novelty_above_p95`, the share of completions more novel than
    the reference p95); each sample's std (and novelty) goes to the completions table (`hydra/std`). Picklable: it carries only its settings, and builds its client on first use."""

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        *,
        aggregation: str | None = None,
        uwo_lambda: float | None = None,
        api_key: str | None = None,
        on_error: OnError = "raise",
        log_metrics: bool = True,
        name: str = "hydra_rm",
        **client_kwargs: Any,
    ) -> None:
        """`url` defaults to $HYDRA_RM_URL (comma-separated for several replicas), `api_key` to
        $HYDRA_RM_API_KEY. `on_error="none"` gives TRL None (a skipped sample) for what cannot be scored
        after the retries, instead of stopping the run."""
        url = url if url is not None else os.environ.get(URL_ENV)
        if not url:
            raise ValueError(f"give the hydra-rm URL, or set ${URL_ENV}")
        self.url = url
        self.aggregation = aggregation
        self.uwo_lambda = uwo_lambda
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.on_error: OnError = on_error
        self.log_metrics = log_metrics
        self.client_kwargs = client_kwargs
        self.__name__ = name  # TRL logs `rewards/<__name__>/mean`
        self._client: AsyncHydraClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shared: tuple[Any, asyncio.Future[ScoreList]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_client=None, _loop=None, _shared=None)  # sockets and futures stay behind
        return state

    def __repr__(self) -> str:
        return f"HydraReward({self.url!r}, aggregation={self.aggregation!r})"

    async def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, **kwargs: Any
    ) -> list[float | None]:
        scores = await self.score(prompts, completions, **kwargs)
        return [s.reward if s is not None else None for s in scores]

    async def score(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> ScoreList:
        """Score a batch once, however many reward functions ask for it (see `head_rewards`): TRL
        passes the same `completions` list to each, so concurrent calls with it share one request."""
        shared = self._shared
        if shared is not None and shared[0] is completions and shared[1].get_loop() is _running_loop():
            return await asyncio.shield(shared[1])
        future = asyncio.ensure_future(self._request(prompts, completions))
        self._shared = (completions, future)
        scores = await asyncio.shield(future)
        if self.log_metrics:
            self._log(scores, kwargs.get("log_metric"), kwargs.get("log_extra"))
        return scores

    def head_rewards(self, head_names: Sequence[str] | None = None) -> list[HeadReward]:
        """One reward function per head, for `multi_objective_aggregation="normalize_then_sum"`
        (each head normalised within its group, then summed with `reward_weights`). All K share one
        request per batch. Head names come from the server unless given."""
        if head_names is None:
            from client._client import HydraClient

            kwargs = {k: v for k, v in self.client_kwargs.items() if k != "concurrency"}
            with HydraClient(self.url, api_key=self.api_key, **kwargs) as c:
                head_names = c.model_info().head_names
        return [HeadReward(self, name) for name in head_names]

    async def _request(self, prompts: Sequence[Any], completions: Sequence[Any]) -> ScoreList:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        items = [to_item(p, c) for p, c in zip(prompts, completions, strict=True)]
        return await self._get_client().score(
            items, aggregation=self.aggregation, uwo_lambda=self.uwo_lambda, on_error=self.on_error
        )

    def _get_client(self) -> AsyncHydraClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # httpx connections belong to one loop
            self._client = AsyncHydraClient(self.url, api_key=self.api_key, **self.client_kwargs)
            self._loop = loop
        return self._client

    @staticmethod
    def _log(scores: ScoreList, log_metric: Any, log_extra: Any) -> None:
        ok: list[Score] = [s for s in scores if s is not None]
        if callable(log_metric) and ok:
            for name in scores.head_names:
                if all(name in s.heads for s in ok):
                    log_metric(f"hydra/{name}", fmean(s.heads[name] for s in ok))
            log_metric("hydra/head_std", fmean(s.std for s in ok))
            log_metric("hydra/min_mean_gap", fmean(s.mean - s.min for s in ok))
            novel = [s for s in ok if s.novelty is not None and s.novelty_percentile is not None]
            if novel:  # models with a novelty statistic: how far from the reference the policy has gone
                log_metric("hydra/novelty", fmean(s.novelty for s in novel))  # type: ignore[misc]
                log_metric("hydra/novelty_percentile", fmean(s.novelty_percentile for s in novel))  # type: ignore[misc]
                log_metric("hydra/novelty_above_p95", fmean(s.novelty_percentile > 95.0 for s in novel))  # type: ignore[operator]
        if callable(log_extra):
            log_extra("hydra/std", [s.std if s is not None else None for s in scores])
            if any(s is not None and s.novelty is not None for s in scores):
                log_extra("hydra/novelty", [s.novelty if s is not None else None for s in scores])


class HeadReward:
    """One head of a HydraReward as its own TRL reward function (named `hydra_<head>` in TRL's logs)."""

    def __init__(self, parent: HydraReward, head: str) -> None:
        self.parent = parent
        self.head = head
        self.__name__ = f"hydra_{head}"

    def __repr__(self) -> str:
        return f"HeadReward({self.parent.url!r}, {self.head!r})"

    async def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, **kwargs: Any
    ) -> list[float | None]:
        scores = await self.parent.score(prompts, completions, **kwargs)
        return [s.heads[self.head] if s is not None else None for s in scores]


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_from_env: HydraReward | None = None


async def reward(
    prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, **kwargs: Any
) -> list[float | None]:
    """`trl grpo --reward_funcs client.trl.reward`: a HydraReward on $HYDRA_RM_URL, built on first use."""
    global _from_env
    if _from_env is None:
        _from_env = HydraReward(name="reward")
    return await _from_env(prompts, completions, completion_ids, **kwargs)
