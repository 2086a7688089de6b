"""Scoring routes: the native `POST /v1/score` and OpenRLHF's `POST /get_reward`.

Both encode in the handler (bad items get a 4xx before queueing), then wait on the shared batcher,
so a sample's reward never depends on which route or which neighbours it came with.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Request

from model_store.tokenization import Item
from scoring.results import item_result
from service.protocol import (
    GetRewardRequest,
    GetRewardResponse,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
    Usage,
)
from service.routes.common import SCORING_ERRORS, get_service, service_named
from service.runtime import ScoringService

router = APIRouter(tags=["scoring"])

_STAT_KEYS = (
    "reward_std",
    "reward_min",
    "reward_mean",
    "reward_max",
    "std_percentile",
    "novelty",
    "novelty_percentile",
)


@router.post(
    "/v1/score",
    response_model=ScoreResponse,
    responses=SCORING_ERRORS,
    summary="Score items with every head; the reward is the chosen aggregation (min by default).",
)
async def score(
    body: ScoreRequest, request: Request, service: ScoringService = Depends(get_service)
) -> ScoreResponse:
    if body.model is not None:
        service = service_named(request, body.model)
    agg = service.request_aggregation(body.aggregation, body.uwo_lambda, body.lcb_beta, body.stdp_beta)
    scores = await service.score_items([it.to_item() for it in body.items], "items", request)
    results = [
        ScoreResult(
            **item_result(
                s,
                agg,
                service.head_names,
                service.quantiles,
                heads=body.return_heads,
                novelty_quantiles=service.novelty.quantiles if service.novelty else None,
            )
        )
        for s in scores
    ]
    engine = service.engine
    return ScoreResponse(
        model=engine.name,
        version=engine.version,
        aggregation=agg.name,
        uwo_lambda=agg.uwo_lambda if agg.kind == "uwo" else None,
        lcb_beta=agg.lcb_beta if agg.kind == "lcb" else None,
        stdp_beta=agg.stdp_beta if agg.kind == "stdp" else None,
        head_names=service.head_names,
        results=results,
        usage=Usage(
            items=len(results),
            tokens=sum(s.tokens for s in scores),
            truncated=sum(s.truncated for s in scores),
        ),
    )


@router.post(
    "/get_reward",
    response_model=GetRewardResponse,
    responses=SCORING_ERRORS,
    summary="OpenRLHF remote reward model: `--remote_rm_url http://host:port/get_reward`.",
    description="Request `{query: [full prompt+response text, ...], prompts?, labels?}`; response "
    "`{rewards, scores, extra_logs}` in input order, aggregated per the server setting (min by default). "
    "`extra_logs` holds one number per query for each key, as OpenRLHF logs them per sample; "
    "`std_percentile` is there only for models with stored disagreement quantiles.",
)
async def get_reward(
    body: GetRewardRequest, request: Request, service: ScoringService = Depends(get_service)
) -> GetRewardResponse:
    return await _get_reward(body, request, service)


@router.post(
    "/models/{name}/get_reward",
    response_model=GetRewardResponse,
    responses=SCORING_ERRORS,
    summary="`/get_reward` for one of several served models (HYDRA_RM_MODELS): one model per URL.",
)
async def get_reward_of(
    body: GetRewardRequest,
    request: Request,
    name: str = Path(description="The model's name, as `/v1/models` lists it."),
) -> GetRewardResponse:
    return await _get_reward(body, request, service_named(request, name, field="name"))


async def _get_reward(body: GetRewardRequest, request: Request, service: ScoringService) -> GetRewardResponse:
    if not body.query:  # older OpenRLHF sends an empty query to idle replicas
        return GetRewardResponse(rewards=[], scores=[], extra_logs={})
    scores = await service.score_items([Item(text=q) for q in body.query], "query", request)
    rewards = [service.aggregation.apply(s) for s in scores]
    logs: dict[str, list[float]] = {
        "reward_std": [s.std for s in scores],
        "reward_min": [s.min for s in scores],
        "reward_mean": [s.mean for s in scores],
        "reward_max": [s.max for s in scores],
    }
    for k, name in enumerate(service.head_names):
        key = name if name not in _STAT_KEYS else f"head_{name}"
        logs[key] = [s.rewards[k] for s in scores]
    if service.quantiles is not None:  # OpenRLHF logs every key as a number per sample: omit, never null
        pct = [service.std_percentile(s.std) for s in scores]
        if all(p is not None for p in pct):
            logs["std_percentile"] = [p for p in pct if p is not None]
    if service.novelty is not None:  # same rule: a number per query, or the key is absent
        us = [s.novelty for s in scores]
        npct = [service.novelty_percentile(u) for u in us]
        if all(u is not None for u in us) and all(p is not None for p in npct):
            logs["novelty"] = [u for u in us if u is not None]
            logs["novelty_percentile"] = [p for p in npct if p is not None]
    return GetRewardResponse(rewards=rewards, scores=rewards, extra_logs=logs)
