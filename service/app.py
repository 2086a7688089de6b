"""The app factory: `create_app(settings)` builds the FastAPI app; the model loads in the lifespan.

Loading happens before uvicorn starts listening, so a served port always means a warmed-up model;
a model that fails to load fails startup loudly instead of serving 503s forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from scoring.settings import Settings, build_engine
from service.auth import ApiKeyMiddleware, api_key_dependency
from service.batcher import forward_thread
from service.errors import install_error_handlers
from service.metrics import Metrics, RequestMetricsMiddleware
from service.middleware import ArrivalMiddleware, Arrivals, BodyLimitMiddleware
from service.routes import health, models, playground, score
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
    docs = settings.resolved_docs()
    shown = docs != "off"
    app = FastAPI(
        title="hydra-rm",
        version=_version(),
        description=DESCRIPTION,
        lifespan=_lifespan(settings, engine, metrics, arrivals),
        openapi_url="/openapi.json" if shown else None,  # None also removes /docs and /redoc
        docs_url="/docs" if shown else None,
        redoc_url="/redoc" if shown else None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    _add_routes(app, settings)
    _add_middleware(app, settings, metrics, arrivals, docs)
    app.openapi = _served_openapi(app, settings)  # type: ignore[method-assign]
    return app


def _lifespan(
    settings: Settings, engine: Any | None, metrics: Metrics, arrivals: Arrivals
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start a ScoringService per engine (built here unless given) and stop them all at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load, warm up and run the model on one thread: see service/batcher.py `forward_thread`.
        torch_thread = forward_thread()
        engines = [engine] if engine is not None else await _build_engines(settings, torch_thread)
        # Several torch models share the one forward thread (one OpenMP pool per process); the app,
        # not a batcher, shuts it down, after every batcher has drained.
        thread = _SharedThread(torch_thread) if len(engines) > 1 else torch_thread
        services: dict[str, ScoringService] = {}
        try:
            for eng in engines:
                name = str(eng.describe()["name"])
                if name in services:
                    raise ValueError(f"HYDRA_RM_MODELS names {name!r} twice; serve each model once")
                # One model: its series as ever, unlabelled. Several: each its own, labelled `model`.
                own = metrics if len(engines) == 1 else metrics.models.setdefault(name, Metrics())
                service = ScoringService(settings, eng, own, arrivals, torch_thread=thread)
                services[name] = service
                await service.start()
            app.state.services = services
            app.state.service = next(iter(services.values()))  # the default model
            yield
        finally:
            await asyncio.gather(*(s.stop() for s in services.values()))
            if thread is not torch_thread:
                torch_thread.shutdown(wait=False)
            for eng in engines if engine is None else ():  # engines we built (vLLM: stop its server)
                close = getattr(eng, "close", None)
                if close is not None:
                    await asyncio.to_thread(close)

    return lifespan


def _add_routes(app: FastAPI, settings: Settings) -> None:
    auth = [Depends(api_key_dependency(settings.api_keys))] if settings.api_keys else []
    app.include_router(health.router)
    app.include_router(score.router, dependencies=auth)
    app.include_router(models.router, dependencies=auth)
    if settings.playground != "off":
        app.include_router(playground.router)


def _add_middleware(
    app: FastAPI, settings: Settings, metrics: Metrics, arrivals: Arrivals, docs: str
) -> None:
    """Innermost first: the body limit, the API key, arrivals, then the request metrics outermost."""
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
        if settings.playground == "auth":
            protected |= playground.PATHS
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys, protected=protected)
    app.add_middleware(ArrivalMiddleware, arrivals=arrivals)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)  # outermost: sees every status


def _served_openapi(app: FastAPI, settings: Settings) -> Callable[[], dict[str, Any]]:
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
        services = app.state.services
        _specialise(
            schema, max(s.engine.num_heads for s in services.values()), settings.max_items_per_request
        )
        path = schema.get("paths", {}).get("/models/{name}/get_reward", {}).get("post", {})
        for param in path.get("parameters", []):
            if param.get("name") == "name":  # this server's model names, not any string
                param["schema"]["enum"] = list(services)
        return schema

    return served_openapi


async def _build_engines(settings: Settings, torch_thread: ThreadPoolExecutor) -> list[Any]:
    """One engine per served model, loaded on the forward thread, each stating its weights' memory."""
    loop = asyncio.get_running_loop()
    engines: list[Any] = []
    try:
        for spec in settings.model_specs():
            eng = await loop.run_in_executor(torch_thread, build_engine, settings.for_model(spec))
            engines.append(eng)
            info = eng.describe()
            log.info(
                "loaded model %s:%s (%s, %d heads): %.1f MiB of weights on %s",
                info["name"], info["version"], info.get("architecture"), eng.num_heads,
                weight_bytes(eng) / 2**20, info.get("device"),
            )  # fmt: skip
    except BaseException:
        for eng in engines:
            close = getattr(eng, "close", None)
            if close is not None:
                close()
        raise
    return engines


def weight_bytes(engine: Any) -> int:
    """Memory of a model's weights: the torch engine's parameters, or the checkpoint vLLM loaded."""
    model = getattr(engine, "model", None)
    if model is not None:
        return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    path = getattr(engine, "path", None)
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path is not None else 0


class _SharedThread(Executor):
    """The forward thread shared by several batchers: a batcher's close must not shut it down under
    the others."""

    def __init__(self, inner: ThreadPoolExecutor) -> None:
        self._inner = inner

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._inner.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


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
