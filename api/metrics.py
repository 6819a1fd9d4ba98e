"""Prometheus `/metrics` for the API: its requests, and the queue as Redis holds it.

Why two kinds: request figures belong to each API process (and gunicorn runs
several), so they use prometheus_client's multiprocess mode (every process
writes its own mmap file in PROMETHEUS_MULTIPROC_DIR, set up by
api/gunicorn_conf.py; the process answering a scrape sums them all). Queue,
job and worker figures are the cluster's, not a process's: they are read
from Redis when /metrics is scraped, by a collector registered only on the
registry that renders the answer, so each scrape has them once whatever
process answers and however many API replicas there are. A process keeps
what it read for `metrics.cache_seconds` (5 s): several Prometheus servers,
or a scrape storm, cost Redis one read per process per interval.

Request latency: `sdq_api_request_duration_seconds{route,method,status}`, a
histogram whose `_count` is the request counter. `route` is the Flask
endpoint (`native.generate`, `health.health`, `unmatched` for a 404/405),
never the raw path. Submissions answered by api/fastsubmit.py before Flask
are observed there under `native.generate`, POST, 202 (one pre-bound
observe, ~3 µs).
"""
from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator

import redis
from flask import Flask, Response, request
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from api.auth import bearer_token
from common.store import PoolStore, TaskStore, WorkerRegistry, WorkerState

log = logging.getLogger("sdqueue.api")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FAST_ROUTE = "native.generate"
UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 900.0)
_STARTED = "sdq.metrics_t0"

JOB_STATUSES = ("submitted", "completed", "failed", "cancelled", "requeued")

REQUESTS = Histogram("sdq_api_request_duration_seconds",
                     "API request latency by route (Flask endpoint), method and status; _count counts requests",
                     ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=None)
_children: dict[tuple[str, str, int], Any] = {}
STREAMS = Gauge("sdq_api_event_streams", "Server-sent event streams the API holds open now (summed over its "
                "processes; each process holds at most api.max_streams)", registry=None, multiprocess_mode="livesum")


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    key = (route, method, status)
    child = _children.get(key)
    if child is None:
        child = _children[key] = REQUESTS.labels(route, method, str(status))
    child.observe(seconds)


def fast_submit_observer() -> Callable[[float], None]:
    """The one call api/fastsubmit.py makes per submission it answers: observe(seconds)."""
    return REQUESTS.labels(FAST_ROUTE, "POST", "202").observe


# --- queue, jobs and workers from Redis -------------------------------------------
def _family(kind: str, name: str, doc: str, labels: list[str] | None = None, **kw: Any) -> Metric:
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return cls(name, doc, labels=labels, **kw)


class QueueCollector:
    """Jobs by status, queue depth per queue and priority, running jobs and live workers, read from Redis.

    Registered on the registry that renders /metrics (never in the multiprocess
    files), so every scrape has each figure exactly once. With several API
    replicas each reports the same figures: aggregate with max(), not sum().
    What one read found is served for `cache_seconds` (`clock` says when, so
    tests need no sleeping); scrapes that arrive during a read wait for it
    instead of reading too.
    """

    def __init__(self, store: TaskStore | None, pools: PoolStore | None, workers: WorkerRegistry | None,
                 default_queue: str, callbacks_queue: str, cache_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.store, self.pools, self.workers = store, pools, workers
        self.default_queue = default_queue
        self.callbacks_queue = callbacks_queue
        self.cache_seconds, self.clock = cache_seconds, clock
        self._lock = threading.Lock()
        self._figures: list[Metric] | None = None
        self._read_at = 0.0

    def describe(self) -> list[Metric]:
        return list(self._families().values())

    def _families(self) -> dict[str, Metric]:
        return {
            "up": _family("gauge", "sdq_redis_up", "1 if the API could read the queue figures from Redis at its "
                                                   "last read (at most metrics.cache_seconds ago)"),
            "jobs": _family("counter", "sdq_jobs", "Jobs by status since the task store began counting "
                                                   "(submitted, completed, failed, cancelled, requeued)", ["status"]),
            "depth": _family("gauge", "sdq_queue_depth", "Jobs waiting, per queue (worker pool) and priority",
                             ["queue", "priority"]),
            "model_depth": _family("gauge", "sdq_queue_model_depth", "Jobs waiting, per queue and model",
                                   ["queue", "model"]),
            "running": _family("gauge", "sdq_jobs_running", "Jobs being processed by a worker"),
            "workers": _family("gauge", "sdq_workers", "Live worker processes per pool and state", ["pool", "state"]),
            "info": _family("gauge", "sdq_worker_info", "A live worker process (always 1)",
                            ["worker", "device", "pool", "role"]),
            "busy": _family("gauge", "sdq_worker_busy", "1 while a GPU worker runs a job", ["worker", "pool"]),
            "models": _family("gauge", "sdq_worker_models_loaded", "Warm pipelines a GPU worker holds",
                              ["worker", "pool"]),
            "held": _family("gauge", "sdq_worker_model_held", "1 per model a GPU worker holds warm",
                            ["worker", "model"]),
        }

    def collect(self) -> Iterator[Metric]:
        yield from self.cached()

    def cached(self) -> list[Metric]:
        """The figures of the last read while they are younger than cache_seconds, else a new read."""
        with self._lock:
            now = self.clock()
            if self._figures is None or now - self._read_at >= self.cache_seconds:
                self._figures, self._read_at = self.read(), now
            return self._figures

    def read(self) -> list[Metric]:
        """Every family, filled from Redis; only `sdq_redis_up` 0 when Redis does not answer."""
        families = self._families()
        try:
            self._fill(families)
        except redis.RedisError as exc:
            log.warning("metrics: cannot read queue figures from Redis: %s", exc)
            families["up"].add_metric([], 0)
            return [families["up"]]
        families["up"].add_metric([], 1)
        return list(families.values())

    def _fill(self, f: dict[str, Metric]) -> None:
        figures = self.store.queue_figures([self.default_queue, *self.pools.names()])
        for status in JOB_STATUSES:
            f["jobs"].add_metric([status], _number(figures.stats.get(status)))
        for status, value in sorted(figures.stats.items()):
            if status not in JOB_STATUSES:
                f["jobs"].add_metric([status], _number(value))
        f["running"].add_metric([], figures.running)
        for (queue, priority), count in figures.depth.items():
            f["depth"].add_metric([queue, priority], count)
        for (queue, model), count in figures.model_depth.items():
            f["model_depth"].add_metric([queue, model], count)
        self._workers(f)

    def _workers(self, f: dict[str, Metric]) -> None:
        newest = {}
        for w in self.workers.live():          # one series per worker name: the newest process wins
            if w.name not in newest or w.last_seen > newest[w.name].last_seen:
                newest[w.name] = w
        per_state: dict[tuple[str, str], int] = {}
        for w in newest.values():
            pool = ",".join(w.queues)
            gpu = w.queues != [self.callbacks_queue]
            per_state[(pool, w.state)] = per_state.get((pool, w.state), 0) + 1
            f["info"].add_metric([w.name, w.device, pool, "gpu" if gpu else "callbacks"], 1)
            if gpu:
                f["busy"].add_metric([w.name, pool], 1 if w.state == WorkerState.BUSY else 0)
                f["models"].add_metric([w.name, pool], len(w.models))
                for model in w.models:
                    f["held"].add_metric([w.name, model], 1)
        for (pool, state), count in sorted(per_state.items()):
            f["workers"].add_metric([pool, state], count)


def _number(value: Any) -> float:
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


# --- the Flask side ------------------------------------------------------------------
def build_registry(svc, settings) -> CollectorRegistry:
    """The registry /metrics renders: every API process's request figures, plus the queue collector."""
    registry = CollectorRegistry()
    if multiprocess_mode():
        os.makedirs(os.environ[MULTIPROC_ENV], exist_ok=True)   # outside gunicorn_conf.py (flask run, tests)
        MultiProcessCollector(registry)
    else:
        registry.register(REQUESTS)
        registry.register(STREAMS)
    registry.register(QueueCollector(svc.store, svc.pools, svc.workers, settings.tasks.queue, settings.callbacks.queue,
                                     settings.metrics.cache_seconds))
    return registry


def exported_names() -> set[str]:
    """Every metric family name /metrics can show (for dashboards and tests)."""
    collector = QueueCollector(None, None, None, "", "")   # describe() reads nothing
    return {REQUESTS._name, STREAMS._name, *(m.name for m in collector.describe())}


def install(app: Flask, settings, svc, limits=None) -> Callable[[float], None]:
    """Time every Flask request, add GET /metrics; returns the fast-path observer for FastSubmit."""
    registry = build_registry(svc, settings)
    token = settings.metrics.token

    def start_clock() -> None:
        request.environ[_STARTED] = time.perf_counter()

    def record(response: Response) -> Response:
        started = request.environ.get(_STARTED)
        if started is not None:
            method = request.method if request.method in METHODS else "other"
            observe_request(request.endpoint or UNMATCHED, method, response.status_code,
                            time.perf_counter() - started)
        return response

    def metrics() -> Response:
        if token and not _token_ok(bearer_token(), token):
            return Response('{"detail": "metrics need Authorization: Bearer <metrics.token>"}\n', 401,
                            {"WWW-Authenticate": "Bearer"}, mimetype="application/json")
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encoder(registry), 200, {"Content-Type": content_type, "Cache-Control": "no-store"})

    # First of the before_request hooks, so requests refused by an earlier hook (rate limits) are timed too.
    app.before_request_funcs.setdefault(None, []).insert(0, start_clock)
    app.after_request(record)
    app.add_url_rule("/metrics", endpoint="metrics", view_func=metrics, methods=["GET"])
    if limits is not None and getattr(limits, "active", False):
        limits.limiter.exempt(metrics)
    return fast_submit_observer()


def _token_ok(presented: str | None, token: str) -> bool:
    """The presented Bearer token equals metrics.token (constant-time comparison)."""
    return presented is not None and hmac.compare_digest(presented.encode(), token.encode())
