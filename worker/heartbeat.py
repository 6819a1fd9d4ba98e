"""Worker heartbeats and the reaper that rescues jobs of dead workers.

Why not the broker's visibility timeout: it must exceed the longest
legitimate job (10 min by default), so a SIGKILLed worker's job would wait
that long. Instead every worker process refreshes a short-TTL key; when a
processing task's worker key has expired, one reaper (a Redis lock makes
it one) bumps the task's attempt and re-sends it. The old delivery, if it
ever wakes, finds a newer attempt and writes nothing.
"""
from __future__ import annotations

import logging
import threading
import time

from celery import Celery

from common.queue import send_generate
from common.taskstore import PREFIX, TaskStore
from common.workers import WorkerInfo, is_alive, publish_heartbeat, remove_heartbeat

log = logging.getLogger("sdqueue.reaper")
REAPER_LOCK = PREFIX + "reaper-lock"
# A requeued job nobody claimed this many heartbeat TTLs later is sent again
# (covers a reaper that died between bumping the attempt and sending).
RESEND_AFTER_TTLS = 6


def reap_once(store: TaskStore, celery: Celery, me: str, ttl: float) -> list[str]:
    """One pass: requeue jobs whose worker is dead. Returns the requeued task ids."""
    client = store.redis
    if not client.set(REAPER_LOCK, me, nx=True, px=int(max(ttl / 2, 1) * 1000)):
        return []
    requeued = []
    now = time.time()
    for task_id, worker, attempt, requeued_at in store.running():
        if worker and not is_alive(client, worker):
            nxt = store.requeue(task_id, worker, attempt)
            if nxt is not None:
                log.warning("worker %s died running %s; resending as attempt %d", worker, task_id, nxt)
                send_generate(celery, task_id, nxt, store.get(task_id).queue)
                requeued.append(task_id)
        elif not worker and requeued_at and now - requeued_at > ttl * RESEND_AFTER_TTLS:
            store.set_fields(task_id, requeued_at=repr(now))
            send_generate(celery, task_id, attempt, store.get(task_id).queue)
            requeued.append(task_id)
    return requeued


class Heartbeat(threading.Thread):
    """Daemon thread: publish this worker's heartbeat and run the reaper."""

    def __init__(self, store: TaskStore, celery: Celery, info: WorkerInfo, settings):
        super().__init__(name="sdq-heartbeat", daemon=True)
        self.store = store
        self.celery = celery
        self.info = info
        self.interval = settings.workers.heartbeat_interval
        self.ttl = settings.workers.heartbeat_ttl
        self.reap_interval = settings.workers.reap_interval
        self._stop_event = threading.Event()

    def beat(self) -> None:
        publish_heartbeat(self.store.redis, self.info, self.ttl)

    def run(self) -> None:
        next_reap = 0.0
        while not self._stop_event.is_set():
            try:
                self.beat()
                if time.monotonic() >= next_reap:
                    reap_once(self.store, self.celery, self.info.id, self.ttl)
                    next_reap = time.monotonic() + self.reap_interval
            except Exception:  # Redis blips must not kill the heartbeat thread
                log.exception("heartbeat failed")
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        try:
            remove_heartbeat(self.store.redis, self.info.id)
        except Exception:
            log.exception("could not remove heartbeat")
