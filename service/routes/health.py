"""Liveness, readiness and metrics: open even when API keys are set (probes and scrapers)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.protocol import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers.")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: model loaded and warmed up, not draining.",
    responses={
        503: {
            "model": Readiness,
            "description": "Loading, draining (after SIGTERM), or the batch worker died.",
        }
    },
)
async def readyz(request: Request) -> Readiness | JSONResponse:
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        return JSONResponse(Readiness(status="loading").model_dump(), status_code=503)
    name = f"{service.engine.name}:{service.engine.version}"
    if service.draining:
        return JSONResponse(Readiness(status="draining", model=name).model_dump(), status_code=503)
    if not service.batcher.alive:  # no worker: every request would time out, so take us out of rotation
        return JSONResponse(Readiness(status="broken", model=name).model_dump(), status_code=503)
    return Readiness(status="ready", model=name)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
