"""Failed authentications per client address: what slows down guessing API keys.

Why in Redis: every API process (and replica) counts the same window, so a
client cannot spread its guesses over processes.
"""
from __future__ import annotations

import redis

from common.store import keys

WINDOW_SECONDS = 60


class AuthFailures:
    """A per-address counter of requests with a missing or wrong key, over a fixed one-minute window."""

    def __init__(self, client: redis.Redis):
        self.client = client

    def record(self, address: str) -> int:
        """Count one failure of `address`; the failures in its current window."""
        pipe = self.client.pipeline(transaction=True)
        pipe.incr(keys.AUTH_FAILURES(address))
        pipe.expire(keys.AUTH_FAILURES(address), WINDOW_SECONDS, nx=True)
        count, _ = pipe.execute()
        return int(count)

    def count(self, address: str) -> int:
        """Failures of `address` in its current window."""
        return int(self.client.get(keys.AUTH_FAILURES(address)) or 0)
