"""What every route needs: the service from app state, and the documented error responses."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from service.errors import NotReady, UnknownModel
from service.protocol import ErrorResponse
from service.runtime import ScoringService


async def get_service(request: Request) -> ScoringService:
    service: ScoringService | None = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise NotReady("model not loaded yet")
    return service


def service_named(request: Request, name: str | None, field: str = "model") -> ScoringService:
    """The service of the model a request chose (`None`: the default, the first of HYDRA_RM_MODELS)."""
    services: dict[str, ScoringService] = getattr(request.app.state, "services", None) or {}
    service = services.get(name) if name is not None else getattr(request.app.state, "service", None)
    if service is None and name is not None and services:
        served = ", ".join(services)
        raise UnknownModel(f"{field}: no model named {name!r} is served here (served: {served})", field=field)
    if service is None or not service.ready:
        raise NotReady("model not loaded yet")
    return service


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description, **extra}


_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
}

# Documented so clients (and schemathesis) know every status a scoring call can answer.
SCORING_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _error("Missing or wrong API key (only when HYDRA_RM_API_KEYS is set)."),
    408: _error("The body did not arrive within body_timeout_s; the connection is closed."),
    413: _error("Body over max_body_bytes, or a request larger than the whole queue."),
    404: _error("`model` names a model this server does not serve (`error.field` is `model`)."),
    422: _error("Invalid input; `error.field` names the offending field, e.g. `items[3].text`."),
    500: _error("The engine failed on this request's items (its neighbours were unaffected)."),
    503: _error("Queue full, model not ready, or shutting down: retry later.", headers=_RETRY_AFTER),
    504: _error("Not scored within request_timeout_s; the items were dropped from the queue."),
}
