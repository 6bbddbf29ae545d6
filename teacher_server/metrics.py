"""Prometheus metrics of the teacher, served over HTTP on `--metrics-port`.

Each server has its own registry (several servers can live in one process, as in
the tests). Series are labelled by tenant where that means something; tenant
names come from the operator's key file, so their number is bounded. Names:

  opd_requests_total{tenant,method,code}         RPCs and stream requests by final status
  opd_request_latency_seconds{tenant,method}     time from arrival to answer
  opd_tokens_scored_total{tenant,teacher}        positions scored (rows returned)
  opd_engine_seconds_total{tenant,teacher}       engine time, each batch's split over its jobs by tokens
  opd_queue_depth{tenant}, opd_queued_tokens{tenant}, opd_in_flight_requests{tenant}
  opd_queue_wait_seconds{tenant}                 time in the queue before the engine
  opd_batch_size{teacher}, opd_batch_tokens{teacher}, opd_batch_seconds{teacher}   per engine forward pass
  opd_alignment_coverage{tenant}                 per request: share of positions with a distribution
  opd_support_mass{tenant}                       per request: mean teacher mass on the support
  opd_rejected_total{tenant,limit}               RESOURCE_EXHAUSTED by limit
  opd_auth_failures_total{reason}                calls refused for a missing or invalid key
  opd_sessions_open, opd_draining
  opd_teacher_info{teacher,model,engine,weights_sha256,base}   one series per hosted teacher
  opd_teacher_memory_bytes{teacher}              process memory its loading added (an adapter: about its size)
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)
FRACTION_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


class TeacherMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self._requests = Counter(
            "opd_requests", "RPCs and stream requests by final status", ["tenant", "method", "code"], registry=registry
        )
        self._latency = Histogram(
            "opd_request_latency_seconds",
            "time from arrival to answer",
            ["tenant", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._tokens = Counter("opd_tokens_scored", "positions scored", ["tenant", "teacher"], registry=registry)
        self._engine_seconds = Counter(
            "opd_engine_seconds", "engine time by tenant and teacher", ["tenant", "teacher"], registry=registry
        )
        self._queue_depth = Gauge("opd_queue_depth", "jobs waiting for the engine", ["tenant"], registry=registry)
        self._queued_tokens = Gauge("opd_queued_tokens", "tokens waiting for the engine", ["tenant"], registry=registry)
        self._in_flight = Gauge("opd_in_flight_requests", "requests queued or scored", ["tenant"], registry=registry)
        self._queue_wait = Histogram(
            "opd_queue_wait_seconds",
            "time in the queue before the engine",
            ["tenant"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._batch_size = Histogram(
            "opd_batch_size", "jobs per forward pass", ["teacher"], buckets=SIZE_BUCKETS, registry=registry
        )
        self._batch_tokens = Histogram(
            "opd_batch_tokens", "tokens per forward pass", ["teacher"], buckets=TOKEN_BUCKETS, registry=registry
        )
        self._batch_seconds = Histogram(
            "opd_batch_seconds", "engine time per forward pass", ["teacher"], buckets=LATENCY_BUCKETS, registry=registry
        )
        self._coverage = Histogram(
            "opd_alignment_coverage",
            "per request: share of scored positions with a teacher distribution",
            ["tenant"],
            buckets=FRACTION_BUCKETS,
            registry=registry,
        )
        self._support_mass = Histogram(
            "opd_support_mass",
            "per request: mean teacher mass on the returned support",
            ["tenant"],
            buckets=FRACTION_BUCKETS,
            registry=registry,
        )
        self._rejected = Counter("opd_rejected", "requests refused by a limit", ["tenant", "limit"], registry=registry)
        self._auth_failures = Counter(
            "opd_auth_failures", "calls refused for a missing or invalid API key", ["reason"], registry=registry
        )
        self.sessions_open = Gauge("opd_sessions_open", "open sessions", registry=registry)
        self.draining = Gauge("opd_draining", "1 while the server drains before exiting", registry=registry)
        self._info = Info("opd_teacher", "a hosted teacher", ["teacher"], registry=registry)
        self._memory = Gauge(
            "opd_teacher_memory_bytes", "process memory a teacher's loading added", ["teacher"], registry=registry
        )
        self._http = None

    # ------------------------------------------------------------------ recording

    def request(self, tenant: str, method: str, code: str, seconds: float) -> None:
        self._requests.labels(tenant, method, code).inc()
        self._latency.labels(tenant, method).observe(seconds)

    def scored(self, tenant: str, teacher: str, positions: int, engine_seconds: float) -> None:
        self._tokens.labels(tenant, teacher).inc(positions)
        self._engine_seconds.labels(tenant, teacher).inc(engine_seconds)

    def score_quality(self, tenant: str, coverage: float, support_mass: float) -> None:
        self._coverage.labels(tenant).observe(coverage)
        self._support_mass.labels(tenant).observe(support_mass)

    def queue(self, tenant: str, jobs: int, tokens: int, in_flight: int) -> None:
        self._queue_depth.labels(tenant).set(jobs)
        self._queued_tokens.labels(tenant).set(tokens)
        self._in_flight.labels(tenant).set(in_flight)

    def queue_wait(self, tenant: str, seconds: float) -> None:
        self._queue_wait.labels(tenant).observe(seconds)

    def batch(self, teacher: str, jobs: int, tokens: int, seconds: float) -> None:
        self._batch_size.labels(teacher).observe(jobs)
        self._batch_tokens.labels(teacher).observe(tokens)
        self._batch_seconds.labels(teacher).observe(seconds)

    def rejected(self, tenant: str, limit: str) -> None:
        self._rejected.labels(tenant, limit).inc()

    def auth_failure(self, reason: str) -> None:
        self._auth_failures.labels(reason).inc()

    def teacher(self, name: str, model: str, engine: str, weights_sha256: str, base: str, memory_bytes: int) -> None:
        self._info.labels(name).info({"model": model, "engine": engine, "weights_sha256": weights_sha256, "base": base})
        self._memory.labels(name).set(memory_bytes)

    # ------------------------------------------------------------------ HTTP

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; returns the port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound = self._http.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
