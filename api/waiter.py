"""Block until a task changes, on Redis pub/sub (no polling loops).

Why one hub per API process: long-polling readers (`?wait=`) and the
synchronous dialects (A1111, /v1/draw) must learn of completion the moment a
worker publishes it. Hundreds may wait at once, so they share ONE pattern
subscription per process and each waits on a threading.Event, instead of
holding a Redis connection apiece. A missed event (Redis restarted while
waiting) costs at most RECHECK_SECONDS: every waiter re-reads its task then.
SSE streams (api/eventstream.py) listen on the same hub, in slots of their
own (`api.max_streams`), and are woken by every event, progress included;
waiters only by the events that may change a task's status.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import redis

from api.metrics import STREAMS
from common.events import STEP_KINDS
from common.store import TaskStore

log = logging.getLogger("sdqueue.api")
RECHECK_SECONDS = 5.0
RECONNECT_SECONDS = 1.0
SUBSCRIBE_WAIT_SECONDS = 2.0


class WaitersFull(Exception):
    """Every wait slot of this process is taken; the caller should retry shortly."""


class StreamsFull(Exception):
    """Every SSE stream slot of this process is taken; the client should reconnect shortly."""


class Listener:
    """One SSE stream's hold on the hub: `news` is set at each event of its task; close() frees the slot (once)."""

    def __init__(self, news: threading.Event, release: Callable[[], None]):
        self.news = news
        self._release: Callable[[], None] | None = release

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class EventHub:
    """One pub/sub listener thread per process, waking the requests that wait on a task."""

    def __init__(self, store: TaskStore, max_waiters: int, max_streams: int = 0):
        self._store = store
        self._slots = threading.BoundedSemaphore(max(1, max_waiters))
        self._stream_slots = threading.BoundedSemaphore(max(1, max_streams))
        self.max_streams = max(1, max_streams)
        self._streams_open = 0
        self._lock = threading.Lock()
        self._waiters: dict[str, dict[threading.Event, bool]] = {}   # task id -> {event: wakes on step events}
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    # --- waiting ------------------------------------------------------------
    def wait_until(self, task_id: str, timeout: float, done: Callable[[], bool], required: bool = False) -> bool:
        """Wait up to `timeout` s until done() holds (checked on each event of the task).

        When every slot is taken: answer done() at once, or raise WaitersFull
        if `required` (a synchronous call that cannot answer without the result).
        """
        if timeout <= 0:
            return done()
        if not self._slots.acquire(blocking=False):
            if required:
                raise WaitersFull()
            return done()
        event = threading.Event()
        try:
            self._register(task_id, event)
            self._subscribed.wait(SUBSCRIBE_WAIT_SECONDS)
            deadline = time.monotonic() + timeout
            while True:
                if done():   # checked after registering, so no event can slip between
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                event.wait(min(remaining, RECHECK_SECONDS))
                event.clear()
        finally:
            self._unregister(task_id, event)
            self._slots.release()

    # --- streaming --------------------------------------------------------------
    def listen(self, task_id: str) -> "Listener":
        """A stream slot and an Event set at every event of the task, until the Listener is closed.

        Raises StreamsFull when every slot of this process is taken (before
        the answer starts, so the client gets a 503).
        """
        if not self._stream_slots.acquire(blocking=False):
            raise StreamsFull()
        event = threading.Event()
        with self._lock:
            self._streams_open += 1
        STREAMS.inc()
        self._register(task_id, event, steps=True)
        self._subscribed.wait(SUBSCRIBE_WAIT_SECONDS)
        return Listener(event, lambda: self._release_stream(task_id, event))

    def _release_stream(self, task_id: str, event: threading.Event) -> None:
        self._unregister(task_id, event)
        with self._lock:
            self._streams_open -= 1
        STREAMS.dec()
        self._stream_slots.release()

    @property
    def streams_open(self) -> int:
        """SSE streams this process holds now (for diagnostics and tests; /metrics counts them as sdq_api_event_streams)."""
        return self._streams_open

    def _register(self, task_id: str, event: threading.Event, steps: bool = False) -> None:
        with self._lock:
            self._ensure_listener()
            self._waiters.setdefault(task_id, {})[event] = steps

    def _unregister(self, task_id: str, event: threading.Event) -> None:
        with self._lock:
            events = self._waiters.get(task_id)
            if events is not None:
                events.pop(event, None)
                if not events:
                    del self._waiters[task_id]

    # --- the listener ---------------------------------------------------------
    def _ensure_listener(self) -> None:
        """Start the listener thread in this process (gunicorn forks after import; threads do not survive)."""
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._subscribed.clear()
        self._thread = threading.Thread(target=self._listen_forever, name="sdq-event-hub", daemon=True)
        self._thread.start()

    def _listen_forever(self) -> None:
        while True:
            try:
                self._listen()
            except (redis.RedisError, OSError) as exc:
                log.warning("event hub lost Redis (%s); reconnecting", exc)
            self._subscribed.clear()
            self._wake_all()   # whatever happened meanwhile, every waiter re-reads its task
            time.sleep(RECONNECT_SECONDS)

    def _listen(self) -> None:
        events = self._store.watch_events()
        try:
            events.start(timeout=SUBSCRIBE_WAIT_SECONDS)
            self._subscribed.set()
            self._wake_all()
            while True:
                news = events.next_event(timeout=RECHECK_SECONDS)
                if news is not None:
                    self._wake(*news)
        finally:
            events.close()

    def _wake(self, task_id: str, kind: str) -> None:
        step_event = kind in STEP_KINDS
        with self._lock:
            for event, steps in self._waiters.get(task_id, {}).items():
                if steps or not step_event:
                    event.set()

    def _wake_all(self) -> None:
        with self._lock:
            for events in self._waiters.values():
                for event in events:
                    event.set()
