"""Live worker processes, as their heartbeats in Redis describe them.

Why: `/health` must say whether any worker holds a warm pipeline, and the
reaper must know that a worker died mid-job. Each worker process writes
`sdq:worker:{id}` (JSON, with a TTL) every few seconds; a key that expired
means the process is gone. The id is unique per process start, so a
restarted worker is never mistaken for its dead predecessor.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields

import redis

from common.taskstore import PREFIX, WORKER_KEY_PREFIX

WORKERS_INDEX = PREFIX + "workers"


class WorkerState:
    """Lifecycle a worker reports (as cog does): starting, ready, busy, setup_failed."""

    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    SETUP_FAILED = "setup_failed"


@dataclass
class WorkerInfo:
    """What a worker says about itself in each heartbeat."""

    id: str
    name: str
    device: str
    queues: list[str]
    state: str = WorkerState.STARTING
    models: list[str] = field(default_factory=list)
    model_loads: int = 0
    task_id: str | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)


def publish_heartbeat(client: redis.Redis, info: WorkerInfo, ttl: float) -> None:
    """Refresh this worker's key (expires after ttl) and its index entry."""
    info.last_seen = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.set(WORKER_KEY_PREFIX + info.id, json.dumps(asdict(info)), px=int(ttl * 1000))
    pipe.zadd(WORKERS_INDEX, {info.id: info.last_seen})
    pipe.execute()


def remove_heartbeat(client: redis.Redis, worker_id: str) -> None:
    """Say goodbye on a clean shutdown so health stops listing us at once."""
    client.delete(WORKER_KEY_PREFIX + worker_id)
    client.zrem(WORKERS_INDEX, worker_id)


def is_alive(client: redis.Redis, worker_id: str) -> bool:
    return bool(worker_id) and client.exists(WORKER_KEY_PREFIX + worker_id) == 1


def worker_from_json(raw: str) -> WorkerInfo:
    """Decode a heartbeat, ignoring fields a newer worker version may add (rolling upgrades)."""
    data = json.loads(raw)
    return WorkerInfo(**{f.name: data[f.name] for f in fields(WorkerInfo) if f.name in data})


def live_workers(client: redis.Redis) -> list[WorkerInfo]:
    """Workers whose heartbeat key has not expired; stale index entries are pruned."""
    ids = client.zrange(WORKERS_INDEX, 0, -1)
    if not ids:
        return []
    values = client.mget([WORKER_KEY_PREFIX + i for i in ids])
    alive, dead = [], []
    for worker_id, raw in zip(ids, values):
        (alive.append(worker_from_json(raw)) if raw else dead.append(worker_id))
    if dead:
        client.zrem(WORKERS_INDEX, *dead)
    return alive
