"""The reaper: every job in `processing` reaches a final state, whatever happened to its worker.

Why not the broker's visibility timeout: it must exceed the longest
legitimate job (10 min by default), so a SIGKILLed worker's job would wait
that long. Instead every worker process refreshes a short-TTL heartbeat
listing the jobs it owes an ending, and one reaper (a Redis lock makes it
one) looks at every processing job each pass:

- its worker is gone (heartbeat expired): the job is resent as its next
  attempt, first in its priority class;
- its worker is alive but has not listed it for a whole heartbeat TTL since
  taking it (the worker finished it, but a Redis restart lost the finish; or
  it moved on): resent the same way;
- it has run past its time limit (`tasks.time_limit`, or a training job's own)
  plus `workers.watchdog_margin` (its worker's
  watchdog could not end it): failed.

The old attempt, if it ever wakes, finds a newer attempt (or a final state)
and writes nothing, so no job is run to completion twice. A job that killed
`tasks.max_attempts` workers (a training job: `training.max_attempts`, since
rolling restarts kill its long runs too and it resumes from a checkpoint) is
failed instead of taking down the next one.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from common.queue import MessageBuilder, hand_over_callback
from common.store import RequeueOutcome, RunningJob, TaskStore, WorkerInfo, WorkerRegistry

log = logging.getLogger("sdqueue.reaper")

OUTBOX_GRACE = 10.0   # seconds an ended task's webhook may wait for its own enqueue before the reaper resends it


@dataclass(frozen=True)
class ReaperRules:
    """The limits a reaper pass applies (from settings)."""

    heartbeat_ttl: float
    time_limit: float
    margin: float
    max_attempts: int
    callbacks_queue: str

    @classmethod
    def from_settings(cls, settings) -> "ReaperRules":
        return cls(settings.workers.heartbeat_ttl, settings.tasks.time_limit, settings.workers.watchdog_margin,
                   settings.tasks.max_attempts, settings.callbacks.queue)

    def limit_of(self, own_limit: float = 0.0) -> float:
        """A job's time limit: its own (JobSpec.time_limit, a training job's), else tasks.time_limit."""
        return own_limit or self.time_limit

    def overdue_after(self, own_limit: float = 0.0) -> float:
        """Seconds after its start when a running job is failed, whoever runs it."""
        return self.limit_of(own_limit) + self.margin


def overdue_error(rules: ReaperRules, own_limit: float = 0.0) -> str:
    """The error of a job failed for running past its time limit (the client sees it)."""
    return (f"job exceeded the time limit of {rules.limit_of(own_limit):g} s and did not stop within "
            f"{rules.margin:g} s more (its worker was hung)")


def rescue_reason(job: RunningJob, worker: WorkerInfo | None, rules: ReaperRules, now: float) -> str | None:
    """Why `job` must be taken from its worker now ("gone", "forgotten", "overdue"), else None."""
    if not job.worker:
        return None                                  # requeued, waiting for a worker to take it
    if worker is None:
        return "gone"
    if job.started_at and now - job.started_at > rules.overdue_after(job.time_limit):
        return "overdue"
    if (worker.jobs is not None and job.task_id not in worker.jobs
            and worker.last_seen - job.started_at >= rules.heartbeat_ttl):
        return "forgotten"
    return None


def rescue(store: TaskStore, messages: MessageBuilder, job: RunningJob, rules: ReaperRules, why: str,
           give_up: str = "") -> RequeueOutcome:
    """Requeue `job` as its next attempt (or fail it with `give_up`); a job that ends here hears its webhook."""
    attempts = job.max_attempts or rules.max_attempts
    result = store.requeue(job, messages.generate(job.task_id, job.attempt + 1, job.queue), attempts,
                           give_up)
    if result.outcome is RequeueOutcome.REQUEUED:
        log.warning("task %s: %s; resent as attempt %d", job.task_id, why, result.attempt)
    elif result.outcome is RequeueOutcome.CANCELLED:
        log.warning("task %s: %s; the client had cancelled it: cancelled", job.task_id, why)
    elif result.outcome is RequeueOutcome.FAILED:
        log.error("task %s: %s; failed: %s", job.task_id, why,
                  give_up or f"{attempts} workers died running it")
    if result.outcome in (RequeueOutcome.CANCELLED, RequeueOutcome.FAILED):
        notify_callback(store, messages, job.task_id, rules.callbacks_queue)
    return result.outcome


WHY = {"gone": "worker {worker} died running it",
       "forgotten": "worker {worker} is alive but no longer runs it (a lost finish, e.g. after a Redis restart)",
       "overdue": "it ran past its time limit on worker {worker}"}


def reap_once(store: TaskStore, workers: WorkerRegistry, messages: MessageBuilder, me: str,
              rules: ReaperRules, now: float | None = None) -> list[str]:
    """One pass (if it is our turn): rescue every job that needs it; returns the ids requeued."""
    if not store.take_reaper_turn(me, max(rules.heartbeat_ttl / 2, 1)):
        return []
    now = time.time() if now is None else now
    live = {w.id: w for w in workers.live()}
    requeued = []
    for job in store.running():
        reason = rescue_reason(job, live.get(job.worker), rules, now)
        if reason is None:
            continue
        outcome = rescue(store, messages, job, rules, WHY[reason].format(worker=job.worker),
                         overdue_error(rules, job.time_limit) if reason == "overdue" else "")
        if outcome is RequeueOutcome.REQUEUED:
            requeued.append(job.task_id)
    reissue_deliveries(store, messages, {q for w in live.values() for q in w.queues})
    resend_owed_callbacks(store, messages, rules.callbacks_queue)
    return requeued


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
