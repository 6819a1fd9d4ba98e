"""Worker heartbeats and the reaper that rescues jobs of dead workers.

Why not the broker's visibility timeout: it must exceed the longest
legitimate job (10 min by default), so a SIGKILLed worker's job would wait
that long. Instead every worker process refreshes a short-TTL key; when a
processing task's worker key has expired, one reaper (a Redis lock makes
it one) bumps the task's attempt and re-sends it. The old delivery, if it
ever wakes, finds a newer attempt and writes nothing. A job that killed
`tasks.max_attempts` workers is failed instead of taking down the next one.
"""
from __future__ import annotations

import logging
import threading
import time

from celery import Celery

from common.queue import MessageBuilder, hand_over_callback
from common.store import RequeueOutcome, TaskStore, WorkerInfo, WorkerRegistry

log = logging.getLogger("sdqueue.reaper")


def reissue_deliveries(store: TaskStore, messages: MessageBuilder, queues: set[str]) -> dict[str, int]:
    """Give waiting jobs that have no delivery on their queue a new one; {queue: deliveries sent}.

    Waiting jobs and deliveries are one-to-one (TaskStore.pick), but a
    delivery can go missing: a worker killed between receiving one and picking
    leaves it unacked until the broker's visibility timeout (> the job time
    limit), and a Redis crash can lose the last second of its AOF. A gap seen
    on two passes in a row is filled (one pass alone may be a worker that is
    picking right now); a surplus is harmless, since a delivery that finds
    nothing waiting is dropped.
    """
    sent = {}
    for queue in sorted(queues):
        missing = max(0, store.pending_count(queue) - store.queued_deliveries(queue))
        count = min(missing, store.record_deficit(queue, missing))
        if count:
            for hint in store.oldest_pending(queue, count):
                store.push_delivery(messages.generate(hint, 0, queue))
            log.warning("queue %s: %d waiting jobs had no delivery; sent %d", queue, missing, count)
            sent[queue] = count
    return sent


OUTBOX_GRACE = 10.0   # seconds an ended task's webhook may wait for its own enqueue before the reaper resends it


def notify_callback(store: TaskStore, messages: MessageBuilder, task_id: str, callbacks_queue: str) -> None:
    """A job the reaper ended: its callback_url (if any) hears of it like any other ending."""
    if store.get(task_id).spec.callback_url:
        hand_over_callback(messages.app, store, task_id, callbacks_queue)


def resend_owed_callbacks(store: TaskStore, messages: MessageBuilder, callbacks_queue: str,
                          now: float | None = None) -> list[str]:
    """Webhooks owed since an ending but never handed to Celery (the enqueue failed, or its process died
    between the finish and the enqueue): sent now. At least once: receivers deduplicate on webhook-id."""
    owed = store.owed_callbacks((now or time.time()) - OUTBOX_GRACE)
    sent = [task_id for task_id in owed if hand_over_callback(messages.app, store, task_id, callbacks_queue)]
    if sent:
        log.warning("resent %d webhook(s) whose enqueue was lost: %s", len(sent), ", ".join(sent))
    return sent


def reap_once(store: TaskStore, workers: WorkerRegistry, messages: MessageBuilder, me: str, ttl: float,
              max_attempts: int, callbacks_queue: str) -> list[str]:
    """One pass: requeue (to the front of its queue) every job whose worker is dead."""
    if not store.take_reaper_turn(me, max(ttl / 2, 1)):
        return []
    requeued = []
    for job in store.running():
        if not job.worker or workers.is_alive(job.worker):
            continue
        result = store.requeue(job, messages.generate(job.task_id, job.attempt + 1, job.queue), max_attempts)
        if result.outcome is RequeueOutcome.CANCELLED:
            log.warning("worker %s died running %s, which the client had cancelled: cancelled", job.worker, job.task_id)
            notify_callback(store, messages, job.task_id, callbacks_queue)
        elif result.outcome is RequeueOutcome.REQUEUED:
            log.warning("worker %s died running %s; resent as attempt %d", job.worker, job.task_id, result.attempt)
            requeued.append(job.task_id)
        elif result.outcome is RequeueOutcome.FAILED:
            log.error("task %s failed: %d workers died running it", job.task_id, max_attempts)
            notify_callback(store, messages, job.task_id, callbacks_queue)
    reissue_deliveries(store, messages, {q for w in workers.live() for q in w.queues})
    resend_owed_callbacks(store, messages, callbacks_queue)
    return requeued


class Heartbeat(threading.Thread):
    """Daemon thread: publish this worker's heartbeat and run the reaper."""

    def __init__(self, store: TaskStore, workers: WorkerRegistry, celery: Celery, info: WorkerInfo, settings):
        super().__init__(name="sdq-heartbeat", daemon=True)
        self.store = store
        self.workers = workers
        self.messages = MessageBuilder(celery)
        self.max_attempts = settings.tasks.max_attempts
        self.callbacks_queue = settings.callbacks.queue
        self.info = info
        self.interval = settings.workers.heartbeat_interval
        self.ttl = settings.workers.heartbeat_ttl
        self.reap_interval = settings.workers.reap_interval
        self._stop_event = threading.Event()

    def beat(self) -> None:
        self.workers.publish(self.info, self.ttl)

    def run(self) -> None:
        next_reap = 0.0
        while not self._stop_event.is_set():
            try:
                self.beat()
                if time.monotonic() >= next_reap:
                    reap_once(self.store, self.workers, self.messages, self.info.id, self.ttl, self.max_attempts,
                              self.callbacks_queue)
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
