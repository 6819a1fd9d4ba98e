"""The Redis client every store shares: rides out short blips, never hangs forever.

Why these settings: every script and write in the stores is safe to retry
after a lost reply (create refuses to overwrite, pick remembers its
delivery, finish accepts its own result), so retrying connection errors for
a few seconds hides a Redis restart from callers.
"""
from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

SOCKET_TIMEOUT = 10.0   # longer than any command here takes; a dead peer cannot hang a thread
RETRIES = 6             # ~5 s of exponential backoff before an error reaches the caller


def redis_client(url: str) -> redis.Redis:
    """A decoding client with timeouts, health checks and retries on connection errors."""
    return redis.Redis.from_url(
        url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=5,
        health_check_interval=30, retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])
