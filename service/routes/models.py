"""`GET /v1/models`: what is served, so a trainer can check heads and aggregation before a run."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.protocol import ModelCard, ModelList
from service.routes.common import SCORING_ERRORS, get_service
from service.runtime import ScoringService

router = APIRouter(tags=["models"])


@router.get(
    "/v1/models",
    response_model=ModelList,
    summary="The served models (the default first): heads, names, encoder, version, limits, default aggregation.",
    responses={k: v for k, v in SCORING_ERRORS.items() if k in (401, 503)},
)
async def list_models(request: Request, service: ScoringService = Depends(get_service)) -> ModelList:
    services = getattr(request.app.state, "services", None) or {"": service}
    return ModelList(data=[_card(s) for s in services.values()])


def _card(service: ScoringService) -> ModelCard:
    info = service.describe()
    return ModelCard(
        id=str(info["name"]),
        version=str(info["version"]),
        num_heads=info["num_heads"],
        head_names=info["head_names"],
        encoder=info.get("encoder"),
        architecture=info.get("architecture"),
        pooling=info["pooling"],
        max_length=info["max_length"],
        truncation_side=info["truncation_side"],
        default_aggregation=info["default_aggregation"],
        uwo_lambda=info["uwo_lambda"],
        chat_template=info["chat_template"],
        device=info["device"],
        token_budget=info["token_budget"],
        max_batch_size=info["max_batch_size"],
        max_items_per_request=info["max_items_per_request"],
        max_body_bytes=info["max_body_bytes"],
        disagreement=info.get("disagreement"),
        novelty=info.get("novelty"),
        novelty_unavailable=info.get("novelty_unavailable"),
        branch_layers=info.get("branch_layers"),
    )
