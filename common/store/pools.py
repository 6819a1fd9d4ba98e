"""Worker pools: named Celery queues, the workers consuming them, and the replicas wanted.

Why: a deployment dedicates GPUs to a model or a tenant by starting workers
for a pool (`python -m worker.main --pool NAME`: they consume the queue
NAME). The AWS SD extension's endpoints are pools: POST /endpoints records a desired
pool and replica count in Redis (the hash `pools` in common/store/keys.py, which autoscaling
reads); whether it is InService is what the live workers' heartbeats say.
sdqueue never starts machines itself; capacity comes from the deployment.

A pool recorded by a key is that key's: it alone sees it, sends jobs to it
and changes it; for every other key it does not exist. Pools nobody owns (the
default queue, a queue live workers serve that no key recorded, a record
without an owner) are shared.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from common.store import keys
from common.store.scripts import LuaScript


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


    def visible_to(self, owner: str) -> bool:
        """Whether `owner` may see and use this pool: its own, or a shared one (no owner)."""
        return self.owner in ("", owner)


class PoolStore:
    """Desired pools in one Redis hash (name -> JSON), plus what the heartbeats show."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._update_if_present = LuaScript(client, "update_pool")

    def record(self, pool: PoolRecord) -> None:
        self.client.hset(keys.POOLS(), pool.name, json.dumps(asdict(pool)))

    def desired(self) -> list[PoolRecord]:
        """Recorded pools, oldest first."""
        pools = [PoolRecord(**json.loads(v)) for v in self.client.hgetall(keys.POOLS()).values()]
        return sorted(pools, key=lambda p: p.started_at)

    def get(self, name: str) -> PoolRecord | None:
        raw = self.client.hget(keys.POOLS(), name)
        return PoolRecord(**json.loads(raw)) if raw else None

    def forget(self, names: list[str]) -> None:
        """Drop recorded pools (unknown names are skipped)."""
        if names:
            self.client.hdel(keys.POOLS(), *names)

    def mark_in_service(self, pool: PoolRecord) -> PoolRecord:
        """Remember when a recorded pool first had a serving worker (its endTime); never resurrects a deleted one."""
        if pool.in_service_at is None:
            pool.in_service_at = time.time()
            self._update_if_present([keys.POOLS()], [pool.name, json.dumps(asdict(pool))])
        return pool

    def names(self) -> list[str]:
        """Every recorded pool's name."""
        return self.client.hkeys(keys.POOLS())
