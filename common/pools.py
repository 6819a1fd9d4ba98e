"""Worker pools: named Celery queues, the workers consuming them, and the replicas wanted.

Why: a deployment dedicates GPUs to a model or a tenant by starting workers
for a pool (`python -m worker.main --pool NAME`: they consume the queue
NAME). Seed 001's endpoints are pools: POST /endpoints records a desired
pool and replica count in Redis (the hash `sdq:pools`, which autoscaling
reads); whether it is InService is what the live workers' heartbeats say.
sdqueue never starts machines itself; capacity comes from the deployment.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from common.taskstore import PREFIX
from common.workers import WorkerInfo, WorkerState, live_workers

POOLS_KEY = PREFIX + "pools"
SERVING_STATES = (WorkerState.READY, WorkerState.BUSY)


@dataclass
class PoolRecord:
    """A pool someone asked for: its name (the queue), the replicas wanted, and its history."""

    name: str
    job_id: str
    replicas: int
    instance_type: str = ""
    owner: str = ""
    started_at: float = field(default_factory=time.time)
    in_service_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_UPDATE_IF_PRESENT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
"""


class PoolStore:
    """Desired pools in one Redis hash (name -> JSON), plus what the heartbeats show."""

    def __init__(self, client: redis.Redis):
        self.redis = client

    def record(self, pool: PoolRecord) -> None:
        self.redis.hset(POOLS_KEY, pool.name, json.dumps(asdict(pool)))

    def desired(self) -> list[PoolRecord]:
        """Recorded pools, oldest first."""
        pools = [PoolRecord(**json.loads(v)) for v in self.redis.hgetall(POOLS_KEY).values()]
        return sorted(pools, key=lambda p: p.started_at)

    def get(self, name: str) -> PoolRecord | None:
        raw = self.redis.hget(POOLS_KEY, name)
        return PoolRecord(**json.loads(raw)) if raw else None

    def forget(self, names: list[str]) -> None:
        """Drop recorded pools (unknown names are skipped)."""
        if names:
            self.redis.hdel(POOLS_KEY, *names)

    def mark_in_service(self, pool: PoolRecord) -> PoolRecord:
        """Remember when a recorded pool first had a serving worker (its endTime); never resurrects a deleted one."""
        if pool.in_service_at is None:
            pool.in_service_at = time.time()
            self.redis.eval(_UPDATE_IF_PRESENT, 1, POOLS_KEY, pool.name, json.dumps(asdict(pool)))
        return pool


def serving_queues(client: redis.Redis) -> dict[str, list[WorkerInfo]]:
    """Queue name -> live workers ready or busy on it."""
    queues: dict[str, list[WorkerInfo]] = {}
    for worker in live_workers(client):
        if worker.state in SERVING_STATES:
            for queue in worker.queues:
                queues.setdefault(queue, []).append(worker)
    return queues
