"""Prometheus metrics of one worker process, served on its own port (metrics.worker_port).

Why per process: a worker is one process on one device, so its figures
(jobs it ran, how long they waited and ran, models it loaded, GPU memory)
are its own; Prometheus scrapes each worker's port (9101 in compose and
k8s; a free port per worker in the local stack). Nothing here may fail a
job: every observation swallows its own errors.

worker/jobs.py calls `observe_job(...)` once per job it ran to an end;
worker/registry.py calls `observe_model_load(...)` after each load.
GPU memory is read from torch at scrape time (never imported by the API).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Iterator

os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)   # one process: the API's multiprocess dir must not leak in

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server   # noqa: E402
from prometheus_client.core import GaugeMetricFamily, Metric   # noqa: E402

log = logging.getLogger("sdqueue.worker")

WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
RUN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 120, 300, 600)
STEPS_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500)
LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

JOBS = Counter("sdq_worker_jobs", "Jobs this worker ran to an end, by model and final status", ["model", "status"])
WAIT = Histogram("sdq_worker_job_wait_seconds", "Queue wait: task created -> claimed by this worker", ["model"],
                 buckets=WAIT_BUCKETS)
RUN = Histogram("sdq_worker_job_run_seconds", "Run time of a job on this worker (claim -> end)", ["model"],
                buckets=RUN_BUCKETS)
STEPS = Histogram("sdq_worker_job_steps_per_second", "Denoising steps per second of a completed job", ["model"],
                  buckets=STEPS_BUCKETS)
LOADS = Counter("sdq_worker_model_loads", "Pipelines this worker loaded (startup and on demand)", ["model"])
LOAD_SECONDS = Histogram("sdq_worker_model_load_seconds", "Seconds a pipeline took to load", ["model"],
                         buckets=LOAD_BUCKETS)


def observe_job(model: str, status: str, wait_seconds: float, run_seconds: float, steps: int) -> None:
    """Record one job that ended on this worker: completed, failed or cancelled.

    wait_seconds: created_at -> claim (None or negative: not observed);
    run_seconds: claim -> end; steps: denoising steps run (steps/s is observed
    for completed jobs with steps and run time).
    """
    try:
        model = model or "unknown"
        JOBS.labels(model, status).inc()
        if wait_seconds is not None and wait_seconds >= 0:
            WAIT.labels(model).observe(wait_seconds)
        if run_seconds is not None and run_seconds >= 0:
            RUN.labels(model).observe(run_seconds)
            if status == "completed" and steps and run_seconds > 0:
                STEPS.labels(model).observe(steps / run_seconds)
    except Exception:  # noqa: BLE001 - metrics never fail a job
        log.exception("could not record job metrics")


def observe_model_load(model: str, seconds: float) -> None:
    """Record one pipeline load (called by worker/registry.py)."""
    try:
        LOADS.labels(model).inc()
        LOAD_SECONDS.labels(model).observe(seconds)
    except Exception:  # noqa: BLE001
        log.exception("could not record model load metrics")


class WorkerCollector:
    """Read at scrape time: who this worker is, what it holds, and its GPU memory when on CUDA."""

    def __init__(self, name: str, device: str, pool: str, models: Callable[[], list[str]]):
        self.name, self.device, self.pool = name, device, pool
        self.models = models

    def describe(self) -> list[Metric]:
        return list(self._families().values())

    def _families(self) -> dict[str, Metric]:
        labels = ["worker", "device", "pool"]
        return {
            "info": GaugeMetricFamily("sdq_worker_process_info", "This worker process (always 1)", labels=labels),
            "models": GaugeMetricFamily("sdq_worker_process_models_loaded", "Warm pipelines this worker holds",
                                        labels=["worker"]),
            "held": GaugeMetricFamily("sdq_worker_process_model_held", "1 per model this worker holds warm",
                                      labels=["worker", "model"]),
            "allocated": GaugeMetricFamily("sdq_worker_gpu_memory_allocated_bytes",
                                           "CUDA memory held by tensors (torch.cuda.memory_allocated)",
                                           labels=["worker", "device"]),
            "reserved": GaugeMetricFamily("sdq_worker_gpu_memory_reserved_bytes",
                                          "CUDA memory reserved by torch's caching allocator "
                                          "(torch.cuda.memory_reserved)", labels=["worker", "device"]),
            "total": GaugeMetricFamily("sdq_worker_gpu_memory_total_bytes", "Memory of the worker's GPU",
                                       labels=["worker", "device"]),
        }

    def collect(self) -> Iterator[Metric]:
        f = self._families()
        f["info"].add_metric([self.name, self.device, self.pool], 1)
        try:
            models = list(self.models())
        except Exception:  # noqa: BLE001 - a scrape during an eviction
            models = []
        f["models"].add_metric([self.name], len(models))
        for model in models:
            f["held"].add_metric([self.name, model], 1)
        yield f["info"]
        yield f["models"]
        yield f["held"]
        memory = gpu_memory(self.device)
        if memory is not None:
            for key in ("allocated", "reserved", "total"):
                f[key].add_metric([self.name, self.device], memory[key])
                yield f[key]


def gpu_memory(device: str) -> dict[str, int] | None:
    """torch's view of this worker's CUDA device, or None off CUDA (torch is only looked at if already imported)."""
    if not device.startswith("cuda") or "torch" not in sys.modules:
        return None
    try:
        torch = sys.modules["torch"]
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        return {"allocated": torch.cuda.memory_allocated(index), "reserved": torch.cuda.memory_reserved(index),
                "total": torch.cuda.get_device_properties(index).total_memory}
    except Exception:  # noqa: BLE001 - a scrape must not break on a driver hiccup
        log.debug("cannot read GPU memory", exc_info=True)
        return None


_collector: WorkerCollector | None = None


def exported_names() -> set[str]:
    """Every metric family name a worker's port can show (for dashboards and tests)."""
    names = {m._name for m in (JOBS, WAIT, RUN, STEPS, LOADS, LOAD_SECONDS)}
    return names | {m.name for m in WorkerCollector("", "", "", list).describe()}


def start_metrics_server(port: int, addr: str, name: str, device: str, pool: str,
                         models: Callable[[], list[str]]) -> Any | None:
    """Serve this process's metrics on addr:port (port 0: off). Never stops the worker if the port is taken."""
    global _collector
    if _collector is None:
        _collector = WorkerCollector(name, device, pool, models)
        REGISTRY.register(_collector)
    else:
        _collector.name, _collector.device, _collector.pool, _collector.models = name, device, pool, models
    if not port:
        return None
    try:
        server, _thread = start_http_server(port, addr=addr or "0.0.0.0")
    except OSError as exc:
        log.error("metrics: cannot listen on %s:%s (%s); this worker's metrics are not served", addr, port, exc)
        return None
    log.info("metrics on http://%s:%d/metrics", addr or "0.0.0.0", port)
    return server
