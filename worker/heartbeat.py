"""Worker heartbeats: a short-TTL key per worker process, and a turn at the reaper (worker/reaper.py).

Why a thread of its own: the heartbeat says the process is alive and which
jobs it owes an ending, whatever its job thread is doing; a process too
wedged to run this thread stops beating, and the reaper rescues its jobs.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from celery import Celery

from common.queue import MessageBuilder
from common.store import TaskStore, WorkerInfo, WorkerRegistry
from worker.reaper import ReaperRules, reap_once

log = logging.getLogger("sdqueue.worker")


class Heartbeat(threading.Thread):
    """Daemon thread: publish this worker's heartbeat and run the reaper."""

    def __init__(self, store: TaskStore, workers: WorkerRegistry, celery: Celery, info: WorkerInfo, settings,
                 owed: Callable[[], list[str]] | None = None):
        super().__init__(name="sdq-heartbeat", daemon=True)
        self.store = store
        self.workers = workers
        self.messages = MessageBuilder(celery)
        self.rules = ReaperRules.from_settings(settings)
        self.info = info
        self.owed = owed
        self.interval = settings.workers.heartbeat_interval
        self.ttl = settings.workers.heartbeat_ttl
        self.reap_interval = settings.workers.reap_interval
        self._stop_event = threading.Event()

    def beat(self) -> None:
        if self.owed is not None:
            self.info.jobs = self.owed()     # read before the write's timestamp: the reaper relies on that order
        self.workers.publish(self.info, self.ttl)

    def run(self) -> None:
        next_reap = 0.0
        while not self._stop_event.is_set():
            try:
                self.beat()
                if time.monotonic() >= next_reap:
                    reap_once(self.store, self.workers, self.messages, self.info.id, self.rules)
                    next_reap = time.monotonic() + self.reap_interval
            except Exception:  # Redis blips must not kill the heartbeat thread
                log.exception("heartbeat failed")
            self._stop_event.wait(self.interval)

    def stop(self, forget: bool = True) -> None:
        """Stop beating; `forget` removes our key at once (a clean exit), else it expires."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=self.interval + 5)
        if not forget:
            return
        try:
            self.workers.remove(self.info.id)
        except Exception:
            log.exception("could not remove heartbeat")
