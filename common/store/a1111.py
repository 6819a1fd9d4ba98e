"""What the AUTOMATIC1111 web UI API remembers per API key: its /options values and its latest job.

Why in Redis: A1111 is one process with global settings and one job at a
time; sdqueue serves many keys from many API processes, so each key gets
its own options and "current job" (for /progress and /interrupt), shared by
every API replica.
"""
from __future__ import annotations

import json
from typing import Any

import redis

from common.store import keys

CURRENT_JOB_TTL = 3600   # /progress of a job older than an hour is of no use to anyone


class A1111Store:
    """Per-key A1111 options (a hash of JSON values) and the key's latest job id."""

    def __init__(self, client: redis.Redis):
        self.client = client

    def options(self, owner: str) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.client.hgetall(keys.A1111_OPTIONS(owner)).items()}

    def save_options(self, owner: str, values: dict[str, Any]) -> None:
        self.client.hset(keys.A1111_OPTIONS(owner), mapping={k: json.dumps(v) for k, v in values.items()})

    def set_current_job(self, owner: str, task_id: str) -> None:
        self.client.set(keys.A1111_CURRENT(owner), task_id, ex=CURRENT_JOB_TTL)

    def current_job(self, owner: str) -> str | None:
        return self.client.get(keys.A1111_CURRENT(owner))
