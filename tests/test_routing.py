"""Scheduling across workers: priority order, per-key backpressure, model affinity, rolling restarts.

Each test gets a queue (worker pool) of its own, an in-process API app that
submits to it, and real worker processes started for that pool, so jobs can
be left waiting before any worker looks at them.
"""
from __future__ import annotations

import signal
import time
import uuid

import pytest

from tests.conftest import KEY_A, KEY_B, KEY_NATIVE_ONLY

TINY = {"width": 64, "height": 64, "num_inference_steps": 2}


class PoolApi:
    """The native API of an in-process app whose jobs go to `queue`."""

    def __init__(self, stack, queue: str, **env: str):
        from api import create_app
        from common.settings import load_settings

        self.queue = queue
        self.app = create_app(load_settings(env={**stack.env(), "SDQ_TASKS_QUEUE": queue, **env}))
        self.client = self.app.test_client()
        self.store = self.app.extensions["sdq"].store

    def post(self, body: dict, key: str = KEY_A):
        return self.client.post("/api/v1/generate", json={"prompt": "a lighthouse", **TINY, **body},
                                headers={"X-API-Key": key})

    def submit(self, key: str = KEY_A, **body) -> str:
        response = self.post(body, key)
        assert response.status_code == 202, response.get_data(as_text=True)
        return response.get_json()["task_id"]

    def task(self, task_id: str, key: str = KEY_A) -> dict:
        return self.client.get(f"/api/v1/tasks/{task_id}", headers={"X-API-Key": key}).get_json()

    def wait_all(self, ids: list[str], timeout: float = 180) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tasks = [self.task(i) for i in ids]
            if all(t["status"] in ("completed", "failed", "cancelled") for t in tasks):
                return tasks
            time.sleep(0.2)
        raise AssertionError(f"not finished: {[t['status'] for t in tasks]}")

    def cancel(self, ids: list[str], key: str = KEY_A) -> None:
        for task_id in ids:
            self.client.delete(f"/api/v1/tasks/{task_id}", headers={"X-API-Key": key})


def start_pool_workers(stack, pool: str, count: int, **env: str) -> list:
    """`count` real worker processes serving `pool`, started together, ready when this returns."""
    services = [stack.start_worker(f"{pool}-{n}-{uuid.uuid4().hex[:4]}", "--pool", pool, env=env, wait=False)
                for n in range(count)]
    for service in services:
        stack.wait_worker_ready(service)
    return services


def pool_workers(rds, pool: str):
    from common.store import WorkerRegistry

    return [w for w in WorkerRegistry(rds).live() if pool in w.queues]


def test_priority_reorders_pending_work_and_queue_position_shows_it(stack, rds):
    pool = "prio-" + uuid.uuid4().hex[:6]
    api = PoolApi(stack, pool)
    order = ["low", "normal", "high", "low", "normal", "high"]
    ids = [api.submit(priority=p, seed=i) for i, p in enumerate(order)]
    by_priority = {p: [i for i, q in zip(ids, order) if q == p] for p in ("high", "normal", "low")}
    positions = {i: api.task(i)["queue_position"] for i in ids}
    assert [positions[i] for i in by_priority["high"]] == [1, 2]
    assert [positions[i] for i in by_priority["normal"]] == [3, 4]
    assert [positions[i] for i in by_priority["low"]] == [5, 6]
    assert api.task(by_priority["high"][0])["priority"] == "high"
    depth = api.store.queue_figures([pool]).depth
    assert {p: depth[(pool, p)] for p in ("high", "normal", "low")} == {"high": 2, "normal": 2, "low": 2}

    (worker,) = start_pool_workers(stack, pool, 1)
    try:
        tasks = api.wait_all(ids)
        assert all(t["status"] == "completed" for t in tasks)
        started = {i: float(rds.hget(f"sdq:task:{i}", "started_at")) for i in ids}
        ran = sorted(ids, key=started.get)
        assert ran == by_priority["high"] + by_priority["normal"] + by_priority["low"]
    finally:
        worker.stop()


def test_per_key_pending_limit_refuses_at_once_and_spares_other_keys(stack):
    api = PoolApi(stack, "nobody-consumes-" + uuid.uuid4().hex[:6], SDQ_TASKS_MAX_PENDING_PER_KEY="2")
    accepted = [api.submit(), api.submit()]
    others = [api.submit(key=KEY_B)]
    try:
        refused = api.post({})
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert "this API key already has 2 jobs waiting (limit 2)" in refused.get_json()["detail"]
        assert api.store.pending_count(api.queue) == 3          # nothing written for the refused one
        api.cancel(accepted[:1])
        accepted.append(api.submit())                          # a freed slot is usable at once
    finally:
        api.cancel(accepted)
        api.cancel(others, key=KEY_B)


def test_priority_is_validated_and_allowed_per_key(stack):
    api = PoolApi(stack, "nobody-consumes-" + uuid.uuid4().hex[:6])
    bad = api.post({"priority": "urgent"})
    assert bad.status_code == 422 and bad.get_json()["detail"][0]["loc"] == ["body", "priority"]
    denied = api.post({"priority": "high"}, key=KEY_NATIVE_ONLY)
    assert denied.status_code == 403 and "priority 'high'" in denied.get_json()["detail"]
    low = api.submit(key=KEY_NATIVE_ONLY, priority="low")
    api.cancel([low], key=KEY_NATIVE_ONLY)


def test_alternating_models_on_two_workers_do_not_thrash(stack, rds):
    """Each worker may hold one model; an A/B/A/B stream: each loads each model at most once."""
    pool = "affinity-" + uuid.uuid4().hex[:6]
    workers = start_pool_workers(stack, pool, 2, SDQ_MODELS_MAX_LOADED="1")
    try:
        api = PoolApi(stack, pool)
        models = ["sdq-tiny", "tiny-single.safetensors"]
        ids = [api.submit(model=models[n % 2], seed=n) for n in range(12)]
        tasks = api.wait_all(ids)
        assert all(t["status"] == "completed" for t in tasks), [t["error_message"] for t in tasks]
        live = pool_workers(rds, pool)
        assert len(live) == 2
        # One load at start (the default model), then at most the other model once.
        assert all(w.model_loads <= 2 for w in live), [(w.name, w.model_loads) for w in live]
        ran_on = {rds.hget(f"sdq:task:{i}", "worker") for i in ids}
        assert len(ran_on) == 2, "both workers should have taken jobs"
        assert {rds.hget(f"sdq:task:{i}", "runs") for i in ids} == {"1"}
    finally:
        for worker in workers:
            worker.stop()


def wait_until_running_a_job(rds, service, timeout: float = 60) -> tuple[str, str]:
    """(task id, worker id) once the worker process of `service` is running a job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task_id in rds.zrange("sdq:running", 0, -1):
            worker_id = rds.hget(f"sdq:task:{task_id}", "worker") or ""
            if f":{service.proc.pid}:" in worker_id:
                return task_id, worker_id
        time.sleep(0.02)
    raise AssertionError(f"{service.name} never ran a job")


def test_rolling_restart_loses_and_duplicates_nothing(stack, rds, storage):
    """SIGTERM: a worker finishes its current job, takes no new one, exits; its successor carries on."""
    pool = "rolling-" + uuid.uuid4().hex[:6]
    workers = start_pool_workers(stack, pool, 2)
    api = PoolApi(stack, pool)
    ids, interrupted = [], []
    for n, old in enumerate(workers):      # a wave of jobs flows while each worker is replaced in turn
        ids += [api.submit(seed=len(ids) + k, num_inference_steps=12) for k in range(8)]
        interrupted.append(wait_until_running_a_job(rds, old))
        old.signal(signal.SIGTERM)
        assert old.proc.wait(60) == 0, "a SIGTERMed worker must exit cleanly once its job is done"
        workers[n] = stack.start_worker(f"{pool}-new{n}", "--pool", pool)
    try:
        tasks = api.wait_all(ids)
        assert [t["status"] for t in tasks] == ["completed"] * len(ids)
        for task_id in ids:
            fields = rds.hmget(f"sdq:task:{task_id}", "attempt", "runs")
            assert fields == ["0", "1"], (task_id, fields)     # never redelivered, never run twice
            listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"{storage.prefix}/{task_id}/")
            assert [o["Key"] for o in listed["Contents"]] == [f"{storage.prefix}/{task_id}/0.png"]
        for task_id, worker_id in interrupted:   # the job a worker had when told to stop: finished by it
            assert rds.hmget(f"sdq:task:{task_id}", "status", "worker") == ["completed", worker_id]
    finally:
        for worker in workers:
            worker.stop()


@pytest.mark.parametrize("wait", [None, 60.0])
def test_pick_rules(stack, wait):
    """TaskStore.pick directly. Affinity off: priority, then arrival. On: a job whose model another live
    worker holds waits for it (routing.affinity_wait, whatever its priority); the worker takes its own."""
    from common.store import NoPick, TaskStatus, TaskStore, WorkerInfo, WorkerRegistry, keys, redis_client

    client = redis_client(stack.redis_url)
    store, workers = TaskStore(client, 3600), WorkerRegistry(client)
    api = PoolApi(stack, "pick-" + uuid.uuid4().hex[:6])
    other = WorkerInfo(id="unit-other", name="unit-other", device="cpu", queues=[api.queue],
                       models=["tiny-single.safetensors"])
    workers.publish(other, ttl=30)
    head = api.submit(model="tiny-single.safetensors")
    own = api.submit(model="sdq-tiny")
    urgent_foreign = api.submit(model="tiny-single.safetensors", priority="high")
    taken = []
    try:
        for _ in range(3):
            picked = store.pick(api.queue, "unit-me", ["sdq-tiny"], 1, wait)
            if isinstance(picked, NoPick):
                break
            taken.append(picked)
        order = [t.task_id for t in taken]
        if wait is None:
            assert order == [urgent_foreign, head, own]
        else:
            # The two jobs left wait for the other worker; their own deliveries are still queued, so this
            # (surplus) one is dropped rather than handed back.
            assert order == [own] and picked is NoPick.EMPTY
            foreign = store.pick(api.queue, "unit-other", ["tiny-single.safetensors"], 1, wait)
            assert foreign.task_id == urgent_foreign
            taken.append(foreign)
            assert not client.exists(keys.WORKER("unit-me"))      # no heartbeat of unit-me to update: nothing invented
    finally:
        workers.remove(other.id)
        client.delete(api.queue)
        for t in taken:
            store.finish(t.task_id, t.attempt, "unit-me", TaskStatus.CANCELLED)
            store.finish(t.task_id, t.attempt, "unit-other", TaskStatus.CANCELLED)
        api.cancel([head, own, urgent_foreign])


def test_a_waiting_job_without_a_delivery_gets_one(stack, api, rds, settings):
    """The reaper fills a gap between waiting jobs and deliveries (a lost or stuck message)."""
    from common.jobspec import JobSpec
    from common.store import TaskStore, redis_client

    store = TaskStore(redis_client(stack.redis_url), 3600)
    task_id = "orphan-" + uuid.uuid4().hex
    spec = JobSpec(prompt="an orphaned job", model="sdq-tiny", width=64, height=64, num_inference_steps=2,
                   guidance_scale=7.5, seed=5)
    owner = api_owner(KEY_A)
    assert store.create(task_id, owner, spec, settings.tasks.queue, message=None)   # no delivery at all
    deadline = time.monotonic() + 60
    while rds.hget(f"sdq:task:{task_id}", "status") != "completed" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rds.hget(f"sdq:task:{task_id}", "status") == "completed"
    assert api.task(task_id)["result_url"]


def api_owner(key: str) -> str:
    from api.auth import ApiKey

    return ApiKey(key, "x").owner
