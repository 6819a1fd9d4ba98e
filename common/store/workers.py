"""Live worker processes, as their heartbeats in Redis describe them.

Why: `/health` must say whether any worker holds a warm pipeline, and the
reaper must know that a worker died mid-job. Each worker process writes
`worker:{id}` (JSON, with a TTL) every few seconds; a key that expired
means the process is gone. The id is unique per process start, so a
restarted worker is never mistaken for its dead predecessor.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields

import redis

from common.store import keys


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
    dtype: str = ""              # the warm weights' precision (float16, bfloat16, float32); "" before a model loads
    max_batch: int = 1           # images one pipeline call may hold (worker.max_batch)
    compiled: bool = False       # the UNet runs torch.compile'd (worker.compile)
    speedups: list[str] = field(default_factory=list)   # worker/speedups.py switches in force
    task_id: str | None = None
    jobs: list[str] | None = None   # every task it owes an ending (running, or its outputs being written); None: unknown
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)


SERVING_STATES = (WorkerState.READY, WorkerState.BUSY)


def worker_from_json(raw: str) -> WorkerInfo:
    """Decode a heartbeat, ignoring fields a newer worker version may add (rolling upgrades)."""
    data = json.loads(raw)
    for name in ("queues", "models", "speedups", "jobs"):
        if data.get(name) == {}:
            data[name] = []      # Lua's cjson (TaskStore.pick rewrites the heartbeat) encodes an empty list as {}
    return WorkerInfo(**{f.name: data[f.name] for f in fields(WorkerInfo) if f.name in data})


class WorkerRegistry:
    """Heartbeats of live worker processes: one expiring key each, plus an index."""

    def __init__(self, client: redis.Redis):
        self.client = client

    def publish(self, info: WorkerInfo, ttl: float) -> None:
        """Refresh this worker's key (expires after ttl) and its index entry."""
        info.last_seen = time.time()
        pipe = self.client.pipeline(transaction=False)
        pipe.set(keys.WORKER(info.id), json.dumps(asdict(info)), px=int(ttl * 1000))
        pipe.zadd(keys.WORKERS(), {info.id: info.last_seen})
        pipe.execute()

    def remove(self, worker_id: str) -> None:
        """Say goodbye on a clean shutdown so health stops listing us at once."""
        self.client.delete(keys.WORKER(worker_id))
        self.client.zrem(keys.WORKERS(), worker_id)

    def is_alive(self, worker_id: str) -> bool:
        return bool(worker_id) and self.client.exists(keys.WORKER(worker_id)) == 1

    def live(self) -> list[WorkerInfo]:
        """Workers whose heartbeat key has not expired; stale index entries are pruned."""
        ids = self.client.zrange(keys.WORKERS(), 0, -1)
        if not ids:
            return []
        values = self.client.mget([keys.WORKER(i) for i in ids])
        alive, dead = [], []
        for worker_id, raw in zip(ids, values):
            (alive.append(worker_from_json(raw)) if raw else dead.append(worker_id))
        if dead:
            self.client.zrem(keys.WORKERS(), *dead)
        return alive

    def serving_queues(self) -> dict[str, list[WorkerInfo]]:
        """Queue name -> live workers ready or busy on it."""
        queues: dict[str, list[WorkerInfo]] = {}
        for worker in self.live():
            if worker.state in SERVING_STATES:
                for queue in worker.queues:
                    queues.setdefault(queue, []).append(worker)
        return queues
