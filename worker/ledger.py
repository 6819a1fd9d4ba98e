"""The tasks a worker process owes an ending, as its heartbeat lists them.

Why: a worker that is alive but no longer runs a task it took (it finished
it, and a Redis restart lost the finish; or its job thread moved on) would
otherwise leave that task `processing` forever, since the reaper only sees a
live worker. Each heartbeat lists what this ledger and the output stage
hold, so the reaper can tell (worker/reaper.py).
"""
from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterable, Iterator


class Ledger:
    """Task ids held by the job thread from the moment they are picked until they are handed on or ended."""

    def __init__(self) -> None:
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def holding(self, task_ids: Iterable[str]) -> Iterator[None]:
        """Hold `task_ids` for the block (the job thread runs them inside it)."""
        ids = list(task_ids)
        with self._lock:
            self._held.update(ids)
        try:
            yield
        finally:
            with self._lock:
                self._held.subtract(ids)
                self._held = +self._held      # drop the ids that reached zero

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._held)
