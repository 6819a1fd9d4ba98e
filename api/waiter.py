"""Block until a task changes, on Redis pub/sub (no polling loops).

Why: long-polling readers (`?wait=`) and synchronous dialects must learn of
completion the moment a worker publishes it, without hammering Redis.
"""
from __future__ import annotations

import time
from typing import Callable

import redis

from common.taskstore import TERMINAL, events_channel


def wait_until(client: redis.Redis, task_id: str, timeout: float, done: Callable[[], bool]) -> bool:
    """Wait up to `timeout` s for a terminal event of `task_id`; True if done() holds at the end."""
    if timeout <= 0:
        return done()
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(events_channel(task_id))
        if done():  # checked after subscribing, so no event can slip between
            return True
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=remaining)
            if message and message.get("data") in TERMINAL:
                break
        return done()
    finally:
        pubsub.close()
