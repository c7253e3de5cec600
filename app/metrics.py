"""Prometheus metrics, on a registry of the app's own.

With WORKERS > 1 every worker writes its samples to PROMETHEUS_MULTIPROC_DIR (set by `api` before
it spawns them) and /metrics aggregates the files of all workers, so any worker answers for all.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from app.config import TIERS

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
TOKEN_BUCKETS = (4, 8, 16, 32, 64, 96, 128, 256, 512)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # In multiprocess mode samples live in files, not in a registry; collection reads them.
        self.registry = CollectorRegistry(auto_describe=True)
        metric_registry = None if self.multiprocess else self.registry
        if self.multiprocess:
            MultiProcessCollector(self.registry)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=metric_registry)

        self.requests = counter(
            "smally_requests_total", "HTTP requests answered", ("endpoint", "status", "cached")
        )
        self.request_latency = Histogram(
            "smally_request_latency_seconds",
            "Time to answer a request",
            ("endpoint",),
            buckets=LATENCY_BUCKETS,
            registry=metric_registry,
        )
        self.inference_latency = Histogram(
            "smally_inference_latency_seconds",
            "Time of one ONNX forward pass",
            buckets=LATENCY_BUCKETS,
            registry=metric_registry,
        )
        self.cache_hits = counter("smally_cache_hits_total", "Cache hits", ("level",))
        self.cache_misses = counter("smally_cache_misses_total", "Cache misses (model ran)")
        self.token_count = Histogram(
            "smally_token_count",
            "Tokens per embedded input (with [CLS]/[SEP])",
            buckets=TOKEN_BUCKETS,
            registry=metric_registry,
        )
        self.key_queries = counter(
            "smally_key_lookup_queries_total", "Queries that looked API keys up in PostgreSQL"
        )
        self.errors = counter("smally_errors_total", "Error responses by code", ("error",))
        self.rate_limited = counter(
            "smally_rate_limit_exceeded_total", "Requests refused by quota", ("tier",)
        )
        self.per_minute_refused = counter(
            "smally_per_minute_limited_total",
            "Requests refused by a per-minute limit, by tier and window (requests, tokens)",
            ("tier", "window"),
        )
        self.abandoned = counter(
            "smally_abandoned_total",
            "Work dropped because its client left: texts not tokenized, rows not embedded",
            ("stage",),
        )
        self.usage_buffer = Gauge(
            "smally_usage_buffer_records",
            "Usage records waiting to be written",
            registry=metric_registry,
            multiprocess_mode="livesum",
        )
        self.usage_dropped = counter(
            "smally_usage_dropped_total", "Usage records dropped because the buffer was full"
        )
        self.quota_rebuilds = counter(
            "smally_quota_counter_rebuilds_total",
            "Quota counters rebuilt from the PostgreSQL ledger (missing or invalid in Redis)",
        )
        self.redis_up = Gauge(
            "smally_redis_up",
            "Whether the service uses Redis (1) or serves without it (0), by role",
            ("role",),
            registry=metric_registry,
            # Any live worker serving without Redis makes the service degraded.
            multiprocess_mode="livemin",
        )
        self.build_info = Gauge(
            "smally_build_info",
            "Build and model of the running service (value is 1)",
            ("version", "git_hash", "model", "model_sha256"),
            registry=metric_registry,
            multiprocess_mode="max",
        )

        # Series that exist from the start read as 0 instead of "no data" on dashboards.
        for tier in TIERS:
            self.rate_limited.labels(tier)
            for window in ("requests", "tokens"):
                self.per_minute_refused.labels(tier, window)
        for stage in ("tokenize", "inference"):
            self.abandoned.labels(stage)
        for level in ("l1", "l2"):
            self.cache_hits.labels(level)
        self.usage_dropped.inc(0)
        self.cache_misses.inc(0)
        self.key_queries.inc(0)
        self.quota_rebuilds.inc(0)

    def redis_state(self, *roles: str) -> Callable[[bool], None]:
        """A RedisLink's `on_change`: sets smally_redis_up for each role the link serves."""

        def set_up(up: bool) -> None:
            for role in roles:
                self.redis_up.labels(role).set(1 if up else 0)

        return set_up

    def render(self) -> bytes:
        return generate_latest(self.registry)
