"""Block until a task changes, on Redis pub/sub (no polling loops).

Why: long-polling readers (`?wait=`) and synchronous dialects must learn of
completion the moment a worker publishes it, without hammering Redis.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import redis

from common.taskstore import TERMINAL, events_channel


class WaitSlots:
    """Caps how many requests of this process wait at once, so waiters cannot starve the API."""

    def __init__(self, limit: int):
        self._slots = threading.BoundedSemaphore(max(1, limit))

    def wait_until(self, client: redis.Redis, task_id: str, timeout: float, done: Callable[[], bool]) -> bool:
        """As `wait_until`, but answers at once (with the current state) when every slot is taken."""
        if not self._slots.acquire(blocking=False):
            return done()
        try:
            return wait_until(client, task_id, timeout, done)
        finally:
            self._slots.release()


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
