"""Prometheus metrics, one registry per app (several apps in one process must not collide).

The point of a multi-head reward model is the head disagreement, so it is a histogram (not a
gauge of the last value): its quantiles over a PPO step show when the policy walks off the data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_store.uncertainty import DisagreementQuantiles, std_percentile
from service.errors import ERROR_TYPE_KEY
from service.middleware import SCORING_PATHS

if TYPE_CHECKING:
    from model_store.tokenization import EncodedItem
    from scoring.batching import PrefixPlan
    from scoring.results import ItemScore

# Rewards of normalised heads live around [-3, 3]; untrained heads can stray further.
_REWARD_BUCKETS = (
    -10.0,
    -5.0,
    -3.0,
    -2.0,
    -1.5,
    -1.0,
    -0.5,
    -0.25,
    0.0,
    0.25,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
)
_SPREAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
# u's scale depends on the model and its reference set (roughly 1/sqrt(N) per unit of feature): decades.
_NOVELTY_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
_PERCENTILE_BUCKETS = (10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 97.5, 99.0, 99.9, 100.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 150.0)


class Metrics:
    """Every series the service exports; `observe_*` methods are called from the batcher and routes."""

    def __init__(self, head_names: Sequence[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Registered in this order (the exposition's order): HTTP, queue and batches, per item, model.
        self._register_http(r)
        self._register_batches(r)
        # hydra_rm_items_above_reference_p95: registered by set_reference_p95 once the model is known.
        self.above_reference_p95: Counter | None = None
        self._reference_p95: float | None = None
        # hydra_rm_novelty*: registered by set_novelty for models with a novelty statistic.
        self.novelty: Histogram | None = None
        self.novelty_percentile: Histogram | None = None
        self.above_novelty_p95: Counter | None = None
        self._novelty_quantiles: DisagreementQuantiles | None = None
        self._register_items(r)
        self._register_model(r, head_names)

    def _register_http(self, r: CollectorRegistry) -> None:
        self.requests = Counter(
            "hydra_rm_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "hydra_rm_request_duration_seconds",
            "HTTP request latency by endpoint and status.",
            ["endpoint", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "hydra_rm_requests_in_flight",
            "HTTP requests being served, by endpoint.",
            ["endpoint"],
            registry=r,
        )
        self.rejected = Counter(
            "hydra_rm_rejected_requests",
            "Scoring requests not scored, by reason: the error type (invalid_request, payload_too_large, "
            "unauthorized, overloaded, timeout, client_disconnected, scoring_failed, ...).",
            ["reason"],
            registry=r,
        )

    def _register_batches(self, r: CollectorRegistry) -> None:
        self.queue_items = Gauge("hydra_rm_queue_items", "Items accepted and not yet scored.", registry=r)
        self.queue_tokens = Gauge("hydra_rm_queue_tokens", "Tokens accepted and not yet scored.", registry=r)
        self.batch_size = Histogram(
            "hydra_rm_batch_size",
            "Items per encoder batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_tokens = Histogram(
            "hydra_rm_batch_tokens",
            "Padded tokens per encoder batch (what the encoder computes).",
            buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072),
            registry=r,
        )
        self.padding_ratio = Histogram(
            "hydra_rm_padding_ratio",
            "Share of each batch's padded tokens that are padding.",
            buckets=(0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
            registry=r,
        )
        self.inference = Histogram(
            "hydra_rm_inference_seconds",
            "Encoder + heads time per batch.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.tokens = Counter("hydra_rm_tokens", "Real (unpadded) tokens scored.", registry=r)
        self.tokens_per_second = Gauge(
            "hydra_rm_tokens_per_second", "Real tokens per second of inference, last batch.", registry=r
        )
        self.items = Counter("hydra_rm_items_scored", "Items scored.", registry=r)

    def _register_items(self, r: CollectorRegistry) -> None:
        """Per item: truncation, prefix sharing, failures, and the heads' rewards and disagreement."""
        self.truncated = Counter("hydra_rm_truncated_items", "Items cut to max_length.", registry=r)
        self.prefix_tokens_saved = Counter(
            "hydra_rm_prefix_tokens_saved",
            "Tokens the encoder did not compute: a prompt shared within a batch encoded once, or an item "
            "that duplicated another (HYDRA_RM_PREFIX_SHARING).",
            registry=r,
        )
        self.prefix_shared_items = Counter(
            "hydra_rm_prefix_shared_items",
            "Items scored against a shared prompt's cached keys/values or as a duplicate; over "
            "hydra_rm_items_scored_total this is the shared-prefix hit rate.",
            registry=r,
        )
        self.batch_failures = Counter(
            "hydra_rm_batch_failures", "Encoder batches that raised (then split to isolate).", registry=r
        )
        self.disagreement = Histogram(
            "hydra_rm_head_disagreement",
            "Std of the rewards across heads, per item: the ensemble's uncertainty.",
            buckets=_SPREAD_BUCKETS,
            registry=r,
        )
        self.min_mean_gap = Histogram(
            "hydra_rm_min_mean_gap",
            "mean - min across heads, per item: what pessimism costs.",
            buckets=_SPREAD_BUCKETS,
            registry=r,
        )
        self.head_reward = Histogram(
            "hydra_rm_head_reward",
            "Reward per head, per item.",
            ["head"],
            buckets=_REWARD_BUCKETS,
            registry=r,
        )

    def _register_model(self, r: CollectorRegistry, head_names: Sequence[str]) -> None:
        self.ready = Gauge("hydra_rm_ready", "1 when the model is loaded and warmed up.", registry=r)
        self.model_info = Gauge(
            "hydra_rm_model_info", "The model served (value 1).", ["name", "version", "num_heads"], registry=r
        )
        self._head_children: list[Histogram] = []
        self.set_heads(head_names)
        self.models: dict[str, Metrics] = {}  # the app's: each served model's own series, by name
        self.arriving = Gauge(
            "hydra_rm_requests_arriving",
            "Scoring requests whose body has arrived, not yet queued (validation, tokenization).",
            registry=r,
        )

    def set_reference_p95(self, p95: float | None) -> None:
        """Count items above the model's reference p95 of head std (the dashboard's drift share).

        Registered only for models with stored quantiles: a 0 share for a model that cannot know
        would read as "no drift", so without them the series is absent and the panel says no data.
        """
        self._reference_p95 = p95
        if p95 is not None and self.above_reference_p95 is None:
            self.above_reference_p95 = Counter(
                "hydra_rm_items_above_reference_p95",
                "Items whose head std is above the model's reference-split p95 (about 5% of items on "
                "data like the reference; a larger share is drift).",
                registry=self.registry,
            )

    def set_novelty(self, quantiles: DisagreementQuantiles | None) -> None:
        """Novelty histograms and the count above the reference p95 of u, for models with the statistic
        only (absent series, not zeros, for models without: same reasoning as set_reference_p95)."""
        self._novelty_quantiles = quantiles
        if quantiles is None or self.novelty is not None:
            return
        self.novelty = Histogram(
            "hydra_rm_novelty",
            "Feature-space novelty u of each item's pooled state against the model's reference set.",
            buckets=_NOVELTY_BUCKETS,
            registry=self.registry,
        )
        self.novelty_percentile = Histogram(
            "hydra_rm_novelty_percentile",
            "Percentile (0-100) of each item's novelty among the reference split's.",
            buckets=_PERCENTILE_BUCKETS,
            registry=self.registry,
        )
        self.above_novelty_p95 = Counter(
            "hydra_rm_items_above_novelty_p95",
            "Items more novel than the reference split's p95 (about 5% on data like the reference; a "
            "larger share is drift, or a policy finding inputs the reward model never saw).",
            registry=self.registry,
        )

    def track_arrivals(self, count: Callable[[], float]) -> None:
        """Read at scrape time from the service's flow control (service/middleware.py: Arrivals)."""
        self.arriving.set_function(count)

    def set_heads(self, head_names: Sequence[str]) -> None:
        # Resolve label children once: .labels() per observation is a dict lookup + lock we can skip.
        self._head_children = [self.head_reward.labels(head=n) for n in head_names]

    def track_queue(self, items: Callable[[], float], tokens: Callable[[], float]) -> None:
        """Queue depth is read at scrape time, so it is never stale."""
        self.queue_items.set_function(items)
        self.queue_tokens.set_function(tokens)

    def observe_prefix(self, plan: PrefixPlan) -> None:
        """Called by the engine after each batch it scored with sharing (its forward thread)."""
        self.prefix_tokens_saved.inc(plan.tokens_saved)
        self.prefix_shared_items.inc(plan.shared_items)

    def observe_batch(
        self,
        batch: Sequence[EncodedItem],
        scores: Sequence[ItemScore],
        seconds: float,
        *,
        padded_forward: bool = True,
    ) -> None:
        """`padded_forward=False` for an engine that runs each sequence unpadded (vLLM's varlen batches):
        its batch computes its real tokens, so padding is 0 rather than what a padded pass would cost."""
        real = sum(e.n_tokens for e in batch)
        padded = max(e.n_tokens for e in batch) * len(batch) if padded_forward else real
        self.batch_size.observe(len(batch))
        self.batch_tokens.observe(padded)
        self.padding_ratio.observe(1.0 - real / padded if padded else 0.0)
        self.inference.observe(seconds)
        self.tokens.inc(real)
        if seconds > 0:
            self.tokens_per_second.set(real / seconds)
        self.items.inc(len(scores))
        heads = self._head_children
        truncated = 0
        for s in scores:
            self.disagreement.observe(s.std)
            self.min_mean_gap.observe(s.mean - s.min)
            for h, v in zip(heads, s.rewards, strict=False):
                h.observe(v)
            truncated += s.truncated
        if truncated:
            self.truncated.inc(truncated)
        p95, above = self._reference_p95, self.above_reference_p95
        if p95 is not None and above is not None:
            above.inc(sum(s.std > p95 for s in scores))
        q = self._novelty_quantiles
        if q is not None and self.novelty is not None and self.novelty_percentile is not None:
            above_u, u_p95 = 0, q.p95
            for s in scores:
                if s.novelty is None or s.novelty != s.novelty:  # NaN rows are counted as failures elsewhere
                    continue
                self.novelty.observe(s.novelty)
                pct = std_percentile(s.novelty, q)
                if pct is not None:
                    self.novelty_percentile.observe(pct)
                above_u += u_p95 is not None and s.novelty > u_p95
            if above_u and self.above_novelty_p95 is not None:
                self.above_novelty_p95.inc(above_u)

    def render(self) -> bytes:
        """The exposition: this app's request series, and each served model's series labelled `model`
        (several models per server: `HYDRA_RM_MODELS`)."""
        if not self.models:
            return generate_latest(self.registry)
        return generate_latest(_ByModel(self))  # type: ignore[arg-type]


# About HTTP requests, counted once per app by RequestMetricsMiddleware; every other series belongs to
# one model's engine, queue and heads.
REQUEST_SERIES = frozenset(
    {
        "hydra_rm_requests",
        "hydra_rm_request_duration_seconds",
        "hydra_rm_requests_in_flight",
        "hydra_rm_rejected_requests",
        "hydra_rm_requests_arriving",
    }
)


class _ByModel:
    """A collector view: the app's request series as they are, the model series of every model's own
    registry merged into one family each, with a `model` label."""

    def __init__(self, app: Metrics) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        for family in self.app.registry.collect():
            if family.name in REQUEST_SERIES:
                yield family
        merged: dict[str, Metric] = {}
        for model, metrics in self.app.models.items():
            for family in metrics.registry.collect():
                if family.name in REQUEST_SERIES:
                    continue
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                out.samples.extend(s._replace(labels={**s.labels, "model": model}) for s in family.samples)
        yield from merged.values()


class RequestMetricsMiddleware:
    """Counts and times every HTTP request by route template (not raw path: bounded cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0  # no response started: set below from what happened
        raw_path = scope.get("path", "")

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        gauge = self.metrics.in_flight.labels(endpoint=raw_path if raw_path in _KNOWN else "other")
        gauge.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            gauge.dec()
            if status == 0:  # the client left before any answer, or an exception escaped to Starlette
                disconnected = scope.get(ERROR_TYPE_KEY) == "client_disconnected"
                status = 499 if disconnected else 500
                scope.setdefault(ERROR_TYPE_KEY, "internal_error")
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or (raw_path if raw_path in _KNOWN else "other")
            labels = {"endpoint": endpoint, "status": str(status)}
            self.metrics.requests.labels(**labels).inc()
            self.metrics.latency.labels(**labels).observe(time.perf_counter() - start)
            if status >= 400 and endpoint in _SCORING:
                self.metrics.rejected.labels(reason=scope.get(ERROR_TYPE_KEY) or f"http_{status}").inc()


_SCORING = SCORING_PATHS
_KNOWN = _SCORING | {"/v1/models", "/healthz", "/readyz", "/metrics"}
