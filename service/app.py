"""The app factory: `create_app(settings)` builds the FastAPI app; the model loads in the lifespan.

Loading happens before uvicorn starts listening, so a served port always means a warmed-up model;
a model that fails to load fails startup loudly instead of serving 503s forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from scoring.settings import Settings, build_engine
from service.auth import ApiKeyMiddleware, api_key_dependency
from service.batcher import forward_thread
from service.errors import install_error_handlers
from service.metrics import Metrics, RequestMetricsMiddleware
from service.middleware import ArrivalMiddleware, Arrivals, BodyLimitMiddleware
from service.routes import health, models, score
from service.runtime import ScoringService

log = logging.getLogger("hydra_rm.app")

# What HYDRA_RM_DOCS guards or hides: the schema shows this server's head indices and item limits.
DOCS_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})

DESCRIPTION = (
    "Multi-head reward model inference for RLHF: one shared encoder, K linear reward heads, the "
    "pessimistic reward (min over heads) by default, with every head and their std per item."
)


def create_app(settings: Settings | None = None, *, engine: Any | None = None) -> FastAPI:
    """Build the app. `engine` (any `scoring.interface.Engine`) skips loading: tests, benches."""
    settings = settings or Settings()
    metrics = Metrics()
    arrivals = Arrivals()
    metrics.track_arrivals(lambda: arrivals.count)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load, warm up and run the model on one thread: see service/batcher.py `forward_thread`.
        torch_thread = forward_thread()
        if engine is not None:
            eng = engine
        else:
            eng = await asyncio.get_running_loop().run_in_executor(torch_thread, build_engine, settings)
        service = ScoringService(settings, eng, metrics, arrivals, torch_thread=torch_thread)
        await service.start()
        app.state.service = service
        try:
            yield
        finally:
            await service.stop()

    docs = settings.resolved_docs()
    shown = docs != "off"
    app = FastAPI(
        title="hydra-rm",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json" if shown else None,  # None also removes /docs and /redoc
        docs_url="/docs" if shown else None,
        redoc_url="/redoc" if shown else None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    auth = [Depends(api_key_dependency(settings.api_keys))] if settings.api_keys else []
    app.include_router(health.router)
    app.include_router(score.router, dependencies=auth)
    app.include_router(models.router, dependencies=auth)
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        arrivals=arrivals,
    )
    if settings.api_keys:  # outside the body limit: unauthenticated bodies are never read
        protected = frozenset(r.path for router in (score.router, models.router) for r in router.routes)
        if docs == "auth":
            protected |= DOCS_PATHS
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys, protected=protected)
    app.add_middleware(ArrivalMiddleware, arrivals=arrivals)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)  # outermost: sees every status
    generic_openapi = app.openapi

    def served_openapi() -> dict[str, Any]:
        """The schema of *this* server: its real head indices and item limits, not just patterns."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generic_openapi()  # FastAPI caches it in app.openapi_schema
        service = getattr(app.state, "service", None)
        if service is None:  # not started yet: do not cache the generic version
            app.openapi_schema = None
            return schema
        _specialise(schema, service.engine.num_heads, settings.max_items_per_request)
        return schema

    app.openapi = served_openapi  # type: ignore[method-assign]
    return app


def _specialise(schema: dict[str, Any], num_heads: int, max_items: int) -> None:
    components = schema.get("components", {}).get("schemas", {})
    request = components.get("ScoreRequest", {}).get("properties", {})
    aggregations = ["min", "mean", "max", "uwo", *(f"head:{i}" for i in range(num_heads))]
    for branch in request.get("aggregation", {}).get("anyOf", []):
        if branch.get("type") == "string":
            branch.pop("pattern", None)
            branch["enum"] = aggregations
    if "items" in request:
        request["items"]["maxItems"] = max_items
    query = components.get("GetRewardRequest", {}).get("properties", {}).get("query")
    if query is not None:
        query["maxItems"] = max_items


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hydra-rm")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0"
