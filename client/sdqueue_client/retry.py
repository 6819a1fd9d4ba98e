"""When to try a request again, and how long to wait first.

Why one policy object: the sync and async clients run the same decisions and
differ only in how they sleep. Connection errors, 429 and 503 are worth a
retry (a submit is safe to repeat: it carries one Idempotency-Key for all its
attempts); any other answer is final. A request the server cannot recognise
as a repeat (creating a dataset or a training job) is retried only when it
never reached the server: after a connection that broke once it was sent,
a second attempt could make a second one. The wait is exponential with full
jitter, unless the server said how long (`Retry-After`, seconds or a date).
"""
from __future__ import annotations

import email.utils
import logging
import random
import time
from dataclasses import dataclass
from typing import Optional, Union

import httpx

log = logging.getLogger("sdqueue_client")

RETRY_STATUSES = frozenset({429, 503})
DEFAULT_RETRIES = 4          # five attempts in all: rides out a restart of one API process
BASE_DELAY = 0.5             # seconds before the first retry (on average half of it, with full jitter)
MAX_DELAY = 30.0             # no single wait longer than this, Retry-After included

Outcome = Union[httpx.Response, httpx.TransportError]


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` more attempts after the first; waits `base * 2**n` (jittered) up to `cap` seconds."""

    retries: int = DEFAULT_RETRIES
    base: float = BASE_DELAY
    cap: float = MAX_DELAY

    def delay(self, attempt: int, outcome: Outcome, replayable: bool = True) -> Optional[float]:
        """Seconds to wait before attempt `attempt + 1`, or None when `outcome` is final.

        `replayable=False`: a transport error is final unless the request surely never got out (see `unsent`).
        """
        if not self.retryable(outcome) or attempt >= self.retries:
            return None
        if not replayable and isinstance(outcome, httpx.TransportError) and not unsent(outcome):
            return None
        told = retry_after(outcome) if isinstance(outcome, httpx.Response) else None
        if told is not None:
            return min(told, self.cap)
        return random.uniform(0, min(self.cap, self.base * 2 ** attempt))

    @staticmethod
    def retryable(outcome: Outcome) -> bool:
        if isinstance(outcome, httpx.Response):
            return outcome.status_code in RETRY_STATUSES
        return isinstance(outcome, httpx.TransportError)


def unsent(error: httpx.TransportError) -> bool:
    """Whether the request cannot have reached the server: no connection was made (a 429 or 503 answer is
    a refusal, retryable anyway)."""
    return isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


def retry_after(response: httpx.Response) -> Optional[float]:
    """The Retry-After header in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def describe(outcome: Outcome) -> str:
    """Why a retry happens, for the log line."""
    if isinstance(outcome, httpx.Response):
        return f"HTTP {outcome.status_code}"
    return f"{type(outcome).__name__}: {outcome}" if str(outcome) else type(outcome).__name__


def log_retry(request: httpx.Request, outcome: Outcome, delay: float, attempt: int) -> None:
    log.info("retrying %s %s in %.2f s (attempt %d, %s)", request.method, request.url.path, delay, attempt + 2,
             describe(outcome))
