"""The HTTP service as a Ray Serve deployment: N replicas of the very same app.

Each replica builds `service.app.create_app(settings)` and serves it as its Serve ingress, so the API,
including `/get_reward`, `/metrics` (of the replica that answers), auth, limits and error bodies, is
the one `hydra-rm serve` has. Serve's proxy spreads requests over the replicas, and inside each replica
the usual batcher forms the batches. Only the public app factory is used here.

Two Serve defaults would hurt us and are overridden:
- `max_ongoing_requests=5` per replica: OpenRLHF sends one request per sample, so the batcher would
  see at most 5 items at a time. Admission is left to the app's own queue limits (503 + Retry-After).
- Serve's HTTP port defaults to 8000, which is also ours; it is set explicitly.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from scoring.settings import Settings, ray_gpus
from service.app import create_app

log = logging.getLogger("hydra_rm.ray_serve")

APP_NAME = "hydra-rm"
# Per replica. Above the app's own queue (HYDRA_RM_MAX_QUEUE_ITEMS=16384 items) in requests, so that
# Serve never queues in front of our batcher: one-sample requests all reach it.
MAX_ONGOING_REQUESTS = 16384


@serve.ingress()  # late-bound: the app is built in the replica, where the model is loaded
class HydraRM:
    """One replica: the app factory's app, model loaded in its lifespan (before Serve routes to it)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self._settings)

    def check_health(self) -> None:
        """Serve restarts a replica whose batch worker died (the app's /readyz says "broken")."""
        app = getattr(self, "_asgi_app", None)
        service = getattr(getattr(app, "state", None), "service", None)
        if service is not None and not service.batcher.alive:
            raise RuntimeError("hydra-rm batch worker is not running")


def deployment(
    settings: Settings,
    *,
    replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float | None = None,
    max_ongoing_requests: int = MAX_ONGOING_REQUESTS,
) -> Any:
    """A bound Serve application. `num_gpus=None` gives each replica one GPU when the cluster has GPUs."""
    num_gpus = ray_gpus(num_gpus)
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        options["num_gpus"] = num_gpus
    dep = serve.deployment(HydraRM).options(
        name="HydraRM",
        num_replicas=replicas,
        ray_actor_options=options,
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=-1,  # the app answers 503 when its own queue is full
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
        health_check_period_s=5.0,
    )
    return dep.bind(settings)


def run(
    settings: Settings,
    *,
    replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float | None = None,
    host: str | None = None,
    port: int | None = None,
    blocking: bool = False,
) -> str:
    """Start Serve on the current Ray cluster (`ray.init` first) and deploy; returns the base URL."""
    host = host or settings.host
    port = port or settings.port
    serve.start(http_options={"host": host, "port": port})
    serve.run(
        deployment(settings, replicas=replicas, num_cpus=num_cpus, num_gpus=num_gpus),
        name=APP_NAME,
        route_prefix="/",
        blocking=blocking,
    )
    return f"http://{host}:{port}"
