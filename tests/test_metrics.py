"""Observability: Prometheus /metrics (API, multiprocess), worker scrape ports, JSON logs, and the
monitoring files (Prometheus config, Grafana dashboard, compose profile)."""
from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import KEY_A
from tests.helpers import SLOW_JOB

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sdqueue.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
FAST = {"prompt": "a metric lighthouse", "width": 64, "height": 64, "num_inference_steps": 2}
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def scrape(url: str, **kw) -> dict[str, list]:
    """Family name -> samples; fails on a non-Prometheus answer."""
    response = requests.get(url, timeout=30, **kw)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain"), response.headers
    families: dict[str, list] = {}
    for family in text_string_to_metric_families(response.text):
        assert family.name not in families, f"{family.name} emitted twice"
        families[family.name] = family.samples
    return families


def value(families: dict, sample_name: str, **labels) -> float | None:
    family = sample_name
    for suffix in SUFFIXES:
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in families:
            family = sample_name[: -len(suffix)]
    for s in families.get(family, []):
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def family_name(sample: str) -> str:
    for suffix in SUFFIXES:
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


# --- the API's /metrics ---------------------------------------------------------------
def test_api_metrics_count_requests_by_route_across_processes(stack, api):
    for _ in range(20):     # two gunicorn processes: both very likely answer some
        assert requests.get(stack.api_url + "/health", timeout=10).status_code == 200
    task_id = api.submit(**FAST)                                   # answered by the fast path
    assert requests.get(stack.api_url + "/no/such/route", timeout=10).status_code == 404
    assert api.get(f"/api/v1/tasks/{task_id}").status_code == 200
    assert api.get(f"/api/v1/tasks/{task_id}", key="wrong-key").status_code == 401
    families = scrape(stack.api_url + "/metrics")                 # no API key needed

    count = "sdq_api_request_duration_seconds_count"
    assert value(families, count, route="health.health", method="GET", status="200") >= 20
    assert value(families, count, route="native.generate", method="POST", status="202") >= 1
    assert value(families, count, route="native.get_task", method="GET", status="200") >= 1
    assert value(families, count, route="native.get_task", method="GET", status="401") >= 1
    assert value(families, count, route="unmatched", method="GET", status="404") >= 1
    routes = {s.labels["route"] for s in families["sdq_api_request_duration_seconds"]}
    assert not any("/" in r for r in routes), routes                # endpoints, never raw paths
    buckets = [s for s in families["sdq_api_request_duration_seconds"]   # GET 200 only: other tests (the fuzz)
               if s.name == "sdq_api_request_duration_seconds_bucket"   # send /health other methods too
               and s.labels["route"] == "health.health" and s.labels["method"] == "GET" and s.labels["status"] == "200"]
    assert len(buckets) > 5 and buckets[-1].labels["le"] == "+Inf" and buckets[-1].value >= 20
    # multiprocess mode: each gunicorn process writes its own file, /metrics sums them
    files = list((stack.data_dir / "prometheus-api").glob("histogram_*.db"))
    assert files, "no multiprocess files: PROMETHEUS_MULTIPROC_DIR not in use"


def test_fast_path_is_timed(stack, api):
    before = value(scrape(stack.api_url + "/metrics"), "sdq_api_request_duration_seconds_count",
                   route="native.generate", method="POST", status="202") or 0
    for _ in range(3):
        api.submit(**FAST)
    after = scrape(stack.api_url + "/metrics")
    assert value(after, "sdq_api_request_duration_seconds_count", route="native.generate", method="POST",
                 status="202") >= before + 3
    assert value(after, "sdq_api_request_duration_seconds_sum", route="native.generate", method="POST",
                 status="202") > 0


def test_queue_depth_per_queue_and_priority(stack, rds):
    from common.store import keys
    from common.store.tasks import PRIORITY_SPAN

    queue = "metrics-test-queue"
    key = keys.PENDING(queue)
    now_ms = int(time.time() * 1000)
    rds.zadd(key, {"h1": now_ms, "n1": PRIORITY_SPAN + now_ms, "l1": 2 * PRIORITY_SPAN + now_ms,
                   "l2": 2 * PRIORITY_SPAN + now_ms + 1})
    rds.zadd(f"{key}:m:sdq-tiny", {"h1": now_ms, "l1": 2 * PRIORITY_SPAN + now_ms})
    rds.sadd(keys.PENDING_INDEXES(), key, f"{key}:m:sdq-tiny")   # as the create step records them (no SCAN)
    try:
        families = scrape(stack.api_url + "/metrics")
    finally:
        rds.delete(key, f"{key}:m:sdq-tiny")
    assert value(families, "sdq_queue_depth", queue=queue, priority="high") == 1
    assert value(families, "sdq_queue_depth", queue=queue, priority="normal") == 1
    assert value(families, "sdq_queue_depth", queue=queue, priority="low") == 2
    assert value(families, "sdq_queue_model_depth", queue=queue, model="sdq-tiny") == 2
    assert value(families, "sdq_queue_depth", queue=f"{queue}:m:sdq-tiny", priority="high") is None
    for priority in ("high", "normal", "low"):      # tasks.queue is always listed
        assert value(families, "sdq_queue_depth", queue="gpu", priority=priority) is not None


def test_jobs_running_workers_and_job_counters(stack, api, rds):
    api.run(**FAST)
    stats = rds.hgetall("sdq:stats:jobs")
    families = scrape(stack.api_url + "/metrics")
    assert value(families, "sdq_redis_up") == 1
    for status in ("submitted", "completed", "failed", "cancelled", "requeued"):
        found = value(families, "sdq_jobs_total", status=status)
        assert found is not None and found >= float(stats.get(status, 0)), (status, found, stats)
    assert value(families, "sdq_jobs_running") is not None
    assert value(families, "sdq_worker_info", worker="worker@local", device="cpu", pool="gpu", role="gpu") == 1
    assert value(families, "sdq_worker_info", worker="callbacks@local", role="callbacks") == 1
    assert value(families, "sdq_worker_busy", worker="worker@local") in (0, 1)
    assert value(families, "sdq_worker_busy", worker="callbacks@local") is None
    assert value(families, "sdq_worker_models_loaded", worker="worker@local") >= 1
    assert value(families, "sdq_worker_model_held", worker="worker@local", model="sdq-tiny") == 1
    assert sum(s.value for s in families["sdq_workers"] if s.labels["pool"] == "gpu") >= 1
    # each cluster figure once per scrape, whichever process answers
    infos = [s for s in families["sdq_worker_info"] if s.labels["worker"] == "worker@local"]
    assert len(infos) == 1


def test_metrics_not_in_openapi_and_token(stack):
    from api import create_app
    from common.settings import load_settings

    assert "/metrics" not in requests.get(stack.api_url + "/openapi.json", timeout=10).json()["paths"]
    app = create_app(load_settings(env={**stack.env(), "SDQ_METRICS_TOKEN": "s3cret-metrics"}))
    client = app.test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"X-API-Key": KEY_A}).status_code == 401    # the API key is not it
    ok = client.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics"})
    assert ok.status_code == 200 and b"sdq_queue_depth" in ok.data


# --- the worker's port -------------------------------------------------------------------
def worker_metrics(stack) -> dict:
    port = stack.services["worker"].metrics_port
    assert port, "the local stack gives each worker a metrics port"
    return scrape(f"http://127.0.0.1:{port}/metrics")


def test_worker_port_has_model_loads_and_info(stack, api):
    api.run(**FAST)
    families = worker_metrics(stack)
    assert value(families, "sdq_worker_model_loads_total", model="sdq-tiny") >= 1
    assert value(families, "sdq_worker_model_load_seconds_count", model="sdq-tiny") >= 1
    assert value(families, "sdq_worker_model_load_seconds_sum", model="sdq-tiny") > 0
    assert value(families, "sdq_worker_process_info", worker="worker@local", device="cpu", pool="gpu") == 1
    assert value(families, "sdq_worker_process_models_loaded", worker="worker@local") >= 1
    assert value(families, "sdq_worker_process_model_held", worker="worker@local", model="sdq-tiny") == 1
    assert "sdq_worker_gpu_memory_allocated_bytes" not in families or not families[
        "sdq_worker_gpu_memory_allocated_bytes"]                   # CPU worker: no GPU figures
    callbacks = stack.services["callbacks"].metrics_port
    assert value(scrape(f"http://127.0.0.1:{callbacks}/metrics"), "sdq_worker_process_info",
                 worker="callbacks@local") == 1


def test_worker_port_has_job_histograms(stack, api):
    if "observe_job" not in (ROOT / "worker" / "jobs.py").read_text():
        pytest.skip("worker/jobs.py does not call worker.metrics.observe_job yet")
    before = value(worker_metrics(stack), "sdq_worker_job_run_seconds_count", model="sdq-tiny") or 0
    assert api.run(**FAST)["status"] == "completed"
    families = worker_metrics(stack)
    assert value(families, "sdq_worker_job_run_seconds_count", model="sdq-tiny") >= before + 1
    assert value(families, "sdq_worker_job_wait_seconds_count", model="sdq-tiny") >= 1
    assert value(families, "sdq_worker_jobs_total", model="sdq-tiny", status="completed") >= 1
    assert value(families, "sdq_worker_job_steps_per_second_count", model="sdq-tiny") >= 1
    buckets = [s for s in families["sdq_worker_job_run_seconds"] if s.name.endswith("_bucket")]
    assert buckets and buckets[-1].labels["le"] == "+Inf"


# --- logs ---------------------------------------------------------------------------------------
def json_lines(path: Path) -> tuple[list[dict], list[str]]:
    docs, other = [], []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            docs.append(json.loads(line))
        except ValueError:
            other.append(line)
    return docs, other


def test_worker_and_api_logs_are_json_with_task_ids(stack, api):
    task_id = api.submit(**FAST)
    assert api.wait(task_id)["status"] == "completed"
    deadline = time.monotonic() + 10
    while True:
        docs, other = json_lines(stack.data_dir / "logs" / "worker.log")
        mine = [d for d in docs if d.get("task_id") == task_id]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # Every logging call is JSON; a library writing to stderr itself (a C++ warning of libtorch) is not ours.
    assert docs and len(other) <= max(3, len(docs) // 50), other[:5]
    assert all({"ts", "level", "logger", "msg"} <= d.keys() for d in docs)
    assert mine, f"no worker log line with task_id {task_id}"
    assert all(d.get("worker") == "worker@local" for d in mine)
    api_docs, api_other = json_lines(stack.data_dir / "logs" / "api.log")
    assert api_docs and len(api_other) <= max(3, len(api_docs) // 50), api_other[:5]
    access = [d for d in api_docs if d["logger"] == "gunicorn.access"]
    assert any(d.get("path") == "/api/v1/generate" and d.get("status") == 202 and "duration_ms" in d for d in access)


def test_log_context_and_formats():
    from common.logs import ContextFilter, JsonFormatter, TextFormatter, log_context, set_process_context

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("sdqueue.test.logs")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        set_process_context(worker="w1")
        with log_context(task_id="t-1", model="m"):
            logger.info("hello %s", "there", extra={"steps": 4})
            with log_context(model="m2"):
                logger.warning("inner")
        logger.info("after")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
        handler.setFormatter(TextFormatter())
        with log_context(task_id="t-2"):
            logger.info("text line")
    finally:
        set_process_context(worker=None)
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    first, inner, after, failed = (json.loads(line) for line in lines[:4])
    assert first["msg"] == "hello there" and first["task_id"] == "t-1" and first["model"] == "m"
    assert first["worker"] == "w1" and first["steps"] == 4 and first["level"] == "INFO"
    assert first["logger"] == "sdqueue.test.logs" and re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert inner["model"] == "m2" and inner["task_id"] == "t-1"
    assert "task_id" not in after and after["worker"] == "w1"
    assert "ValueError: boom" in failed["exc"]
    assert lines[-1].endswith("text line [task_id=t-2 worker=w1]")


def test_observe_job_in_process():
    from prometheus_client import REGISTRY

    from worker.metrics import observe_job, observe_model_load

    def sample(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0

    before = sample("sdq_worker_jobs_total", model="unit-model", status="completed")
    observe_job("unit-model", "completed", 1.5, 2.0, 20)
    observe_job("unit-model", "failed", None, 0.5, 0)
    observe_model_load("unit-model", 3.0)
    assert sample("sdq_worker_jobs_total", model="unit-model", status="completed") == before + 1
    assert sample("sdq_worker_jobs_total", model="unit-model", status="failed") >= 1
    assert sample("sdq_worker_job_steps_per_second_sum", model="unit-model") >= 10.0
    assert sample("sdq_worker_job_wait_seconds_count", model="unit-model") >= 1
    assert sample("sdq_worker_job_run_seconds_count", model="unit-model") >= 2
    assert sample("sdq_worker_model_loads_total", model="unit-model") >= 1


def test_worker_collector_reads_gpu_memory_at_scrape_time(monkeypatch):
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from worker.metrics import WorkerCollector

    calls = []
    cuda = SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, current_device=lambda: 0,
                           memory_allocated=lambda i: calls.append(i) or 1000, memory_reserved=lambda i: 2000,
                           get_device_properties=lambda i: SimpleNamespace(total_memory=8000))
    fake = SimpleNamespace(cuda=cuda, device=lambda d: SimpleNamespace(index=int(d.split(":")[1]) if ":" in d else None))
    monkeypatch.setitem(sys.modules, "torch", fake)
    registry = CollectorRegistry()
    registry.register(WorkerCollector("gpu0@h", "cuda:0", "gpu", lambda: ["a", "b"]))
    assert not calls                                   # nothing read until a scrape
    text = generate_latest(registry).decode()
    assert calls == [0]
    assert 'sdq_worker_gpu_memory_allocated_bytes{device="cuda:0",worker="gpu0@h"} 1000.0' in text
    assert 'sdq_worker_gpu_memory_reserved_bytes{device="cuda:0",worker="gpu0@h"} 2000.0' in text
    assert 'sdq_worker_gpu_memory_total_bytes{device="cuda:0",worker="gpu0@h"} 8000.0' in text
    assert 'sdq_worker_process_models_loaded{worker="gpu0@h"} 2.0' in text


def test_api_never_imports_torch():
    result = subprocess.run([sys.executable, "-c", "import sys, api, api.metrics, api.fastsubmit; "
                             "print('torch' in sys.modules)"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


class CountingStores:
    """Task, pool and worker stores that count the queue reads /metrics makes (the queue figures are fixed)."""

    def __init__(self, depth: int = 3):
        self.reads, self.depth, self.fail = 0, depth, False

    def queue_figures(self, queues):
        from common.store.tasks import QueueFigures

        self.reads += 1
        if self.fail:
            import redis

            raise redis.ConnectionError("Redis went away")
        return QueueFigures({"submitted": "5"}, 1, {(q, "normal"): self.depth for q in queues}, {})

    def names(self):
        return []

    def live(self):
        return []


def test_queue_figures_are_read_once_per_interval_whoever_scrapes():
    """Many scrapes inside metrics.cache_seconds cost one Redis read; the clock is injected, nothing sleeps."""
    from prometheus_client import CollectorRegistry, generate_latest

    from api.metrics import QueueCollector

    now = [100.0]
    stores = CountingStores()
    registry = CollectorRegistry()
    registry.register(QueueCollector(stores, stores, stores, "gpu", "callbacks", cache_seconds=5, clock=lambda: now[0]))
    for _ in range(50):                                  # a scrape storm, or many Prometheus servers
        text = generate_latest(registry).decode()
    assert stores.reads == 1 and 'sdq_queue_depth{priority="normal",queue="gpu"} 3.0' in text
    stores.depth, now[0] = 7, 104.9
    assert 'queue="gpu"} 3.0' in generate_latest(registry).decode() and stores.reads == 1
    now[0] = 105.0                                       # the interval is over: one new read
    assert 'queue="gpu"} 7.0' in generate_latest(registry).decode() and stores.reads == 2
    stores.fail, now[0] = True, 111.0                    # Redis down: up 0, and that is cached as well
    for _ in range(3):
        assert "sdq_redis_up 0.0" in generate_latest(registry).decode()
    assert stores.reads == 3


def test_no_cache_reads_at_every_scrape():
    from prometheus_client import CollectorRegistry, generate_latest

    from api.metrics import QueueCollector

    stores = CountingStores()
    registry = CollectorRegistry()
    registry.register(QueueCollector(stores, stores, stores, "gpu", "callbacks", cache_seconds=0, clock=lambda: 1.0))
    for _ in range(3):
        generate_latest(registry)
    assert stores.reads == 3


def test_concurrent_scrapes_share_one_read():
    """Scrapes that arrive while a read is under way wait for it instead of reading too."""
    import threading

    from prometheus_client import CollectorRegistry, generate_latest

    from api.metrics import QueueCollector

    stores = CountingStores()
    started, release = threading.Event(), threading.Event()
    figures = stores.queue_figures

    def slow_figures(queues):
        started.set()
        release.wait(10)
        return figures(queues)

    stores.queue_figures = slow_figures
    registry = CollectorRegistry()
    registry.register(QueueCollector(stores, stores, stores, "gpu", "callbacks", cache_seconds=5, clock=lambda: 1.0))
    threads = [threading.Thread(target=generate_latest, args=(registry,)) for _ in range(8)]
    threads[0].start()
    assert started.wait(10)
    for t in threads[1:]:
        t.start()
    release.set()
    for t in threads:
        t.join(10)
    assert stores.reads == 1


# --- monitoring files ---------------------------------------------------------------------
def exported_names() -> set[str]:
    from api.metrics import exported_names as api_names
    from worker.metrics import exported_names as worker_names

    return api_names() | worker_names()


def test_dashboard_uses_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    used = {family_name(m) for e in exprs for m in re.findall(r"\bsdq_[a-z0-9_]+", e)}
    exported = exported_names()
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for needed in ("queue depth", "throughput", "api request latency", "queue wait", "run time", "utilisation",
                   "model loads"):
        assert needed in titles, needed
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert uids == {datasource["datasources"][0]["uid"]}
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_prometheus_config_scrapes_api_and_workers():
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api = jobs["sdqueue-api"]
    assert api["metrics_path"] == "/metrics" and api["dns_sd_configs"][0]["port"] == 8000
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    targets = {t for c in jobs["sdqueue-worker"]["static_configs"] for t in c["targets"]}
    for name, service in compose.items():
        if "worker.main" in " ".join(service.get("command") or []) or name.startswith("worker-gpu"):
            port = service["environment"]["SDQ_METRICS_WORKER_PORT"]
            assert f"{name}:{port}" in targets, name
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/sdqueue.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"


def test_compose_monitoring_profile():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    assert any("deploy/prometheus/prometheus.yml" in v for v in services["prometheus"]["volumes"])
    assert any(v.startswith("./deploy/grafana/dashboards:") for v in services["grafana"]["volumes"])
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    for name in ("worker-gpu0", "worker-gpu1", "callbacks"):
        assert services[name]["environment"]["SDQ_METRICS_WORKER_PORT"] == "9101"
    command = (["docker", "compose"] if shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True).returncode == 0 else
        ["docker-compose"] if shutil.which("docker-compose") else None)
    if command is None:
        pytest.skip("no docker compose client on this machine")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "SDQ_API_KEYS": "k1", "MINIO_ROOT_PASSWORD": "minio-secret-1",
           "FLOWER_BASIC_AUTH": "admin:pw", "SDQ_CALLBACKS_SECRET": "whsec_c2VjcmV0", "SDQ_METRICS_TOKEN": "t"}
    result = subprocess.run([*command, "--profile", "monitoring", "config"], cwd=ROOT, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]
    assert {"prometheus", "grafana"} <= set(rendered)


def test_a_scrape_scans_no_keyspace_and_forgets_emptied_indexes(stack, api, rds):
    """Queue depths come from the registry the create step writes: a scrape never SCANs; an index whose jobs
    all left is pruned from it."""
    from common.store import keys

    api.run(**FAST)
    rds.sadd(keys.PENDING_INDEXES(), keys.PENDING("long-gone-queue"))
    before = rds.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)
    scrape(stack.api_url + "/metrics")
    assert rds.info("commandstats").get("cmdstat_scan", {}).get("calls", 0) == before
    assert keys.PENDING("long-gone-queue") not in rds.smembers(keys.PENDING_INDEXES())


def test_open_event_streams_are_counted(stack, api):
    """sdq_api_event_streams: a stream held open counts (summed over the API's processes) until it closes."""
    blocker = api.submit(**SLOW_JOB)
    waiting = api.submit()
    with requests.get(f"{api.base}/api/v1/tasks/{waiting}/events", headers=api.headers(), stream=True,
                      timeout=60) as held:
        next(held.iter_lines())                                          # the stream is open
        assert value(scrape(stack.api_url + "/metrics"), "sdq_api_event_streams") >= 1
    api.delete(f"/api/v1/tasks/{blocker}")
    api.delete(f"/api/v1/tasks/{waiting}")
