"""Redis durability: after a Redis restart (AOF everysec), pending and finished tasks are all still
there, pending ones still run, and a worker that stayed up across the restart carries on.

Its own Redis and worker (the session stack's S3 and models), so restarting Redis disturbs no other test.
"""
from __future__ import annotations

import signal
import threading
import time

import pytest
import redis

from dev.localstack import LocalStack, free_port
from tests.conftest import KEY_A, STACK_ENV
from tests.helpers import wait_until
from tests.test_routing import PoolApi

QUEUE = "durable"


@pytest.fixture
def own_redis(stack, tmp_path):
    own = LocalStack(data_dir=tmp_path, redis_port=free_port(), s3_port=stack.s3_port, api_port=free_port(),
                     flower_port=free_port(), api_keys=[KEY_A], flower_password="pw",
                     extra_env={**STACK_ENV, "SDQ_MODELS_DIR": str(stack.settings().models_dir),
                                "SDQ_MODELS_LORA_DIR": str(stack.settings().lora_dir)})
    own.start_redis()
    try:
        yield own
    finally:
        own.stop()


def restart_redis(own: LocalStack) -> None:
    """SIGTERM (Redis flushes its AOF and exits), then the same server on the same data dir."""
    own.services.pop("redis").stop()
    own.start_redis()


def test_tasks_survive_a_redis_restart_and_pending_ones_still_run(own_redis):
    api = PoolApi(own_redis, QUEUE)
    worker = own_redis.start_worker("durable-worker", "--pool", QUEUE)
    done = api.wait_all([api.submit(seed=1)])[0]
    assert done["status"] == "completed"
    worker.stop()                                       # nobody consumes: the next jobs stay pending
    pending = [api.submit(seed=2), api.submit(seed=3, priority="high")]
    before = [api.task(i) for i in pending]

    restart_redis(own_redis)

    after_done = api.task(done["task_id"])
    assert after_done["status"] == "completed" and after_done["result_url"]
    assert after_done["seeds"] == done["seeds"]
    after = [api.task(i) for i in pending]
    assert [t["status"] for t in after] == ["pending", "pending"]
    assert [t["queue_position"] for t in after] == [t["queue_position"] for t in before] == [2, 1]

    worker = own_redis.start_worker("durable-worker-2", "--pool", QUEUE)
    assert [t["status"] for t in api.wait_all(pending)] == ["completed", "completed"]

    restart_redis(own_redis)                            # now with a worker up across the restart
    time.sleep(1)
    late = api.submit(seed=4)
    assert api.wait_all([late], timeout=120)[0]["status"] == "completed"
    client = redis.Redis.from_url(own_redis.redis_url, decode_responses=True)
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    worker.stop()


def test_every_accepted_submission_ends_after_redis_is_killed_under_load(own_redis):
    """SIGKILL (no AOF flush at exit) while jobs are submitted and run: every submission that got a 2xx
    reaches a final state; the ones refused meanwhile got a clear 503, never a 500."""
    api = PoolApi(own_redis, QUEUE)
    worker = own_redis.start_worker("loaded-worker", "--pool", QUEUE)
    accepted: list[str] = []
    refused: list[int] = []
    stop = threading.Event()

    def submit_until_stopped() -> None:
        client = api.app.test_client()
        n = 0
        while not stop.is_set():
            n += 1
            response = client.post("/api/v1/generate", json={"prompt": "a harbour", "width": 64, "height": 64,
                                                              "num_inference_steps": 2, "seed": n},
                                   headers={"X-API-Key": KEY_A})
            if response.status_code == 202:
                accepted.append(response.get_json()["task_id"])
            else:
                assert response.status_code == 503 and response.is_json, response.get_data(as_text=True)
                refused.append(response.status_code)
            time.sleep(0.05)

    submitter = threading.Thread(target=submit_until_stopped)
    submitter.start()
    try:
        wait_until(lambda: len(accepted) >= 10)
        own_redis.services["redis"].signal(signal.SIGKILL)
        own_redis.services.pop("redis").proc.wait(10)
        wait_until(lambda: refused)                      # the API noticed, and said so with a 503
        own_redis.start_redis()
        before = len(accepted)
        wait_until(lambda: len(accepted) >= before + 10)
    finally:
        stop.set()
        submitter.join(30)
    tasks = api.wait_all(accepted, timeout=300)         # a hang guard, not a timing claim
    assert all(t["status"] in ("completed", "failed", "cancelled") for t in tasks), tasks
    assert [t["status"] for t in tasks].count("completed") == len(accepted)
    worker.stop()
