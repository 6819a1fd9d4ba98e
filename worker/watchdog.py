"""The watchdog: a thread beside the job's that ends a worker whose job hangs.

Why outside the job's thread: the step callback (worker/monitor.py) stops a
job that runs past its time limit, but only between steps. A hung CUDA call,
a stalled read or a model load that never returns never reaches the next
step, and the heartbeat (another thread) keeps saying the worker is alive,
so the reaper alone would never rescue the job. The watchdog looks at the
running jobs every second:

- past its time limit (`tasks.time_limit`, or a training job's own) plus
  `workers.watchdog_margin`: the job is failed;
- no step for `workers.stall_timeout` outside setup (fetching files, loading
  a model): the job is resent as its next attempt (a fresh worker may well
  run it; `tasks.max_attempts` bounds the retries).

Either way the process then exits (EXIT_HUNG): its job thread cannot be
stopped from outside and may hold the GPU, so the worker starts afresh
(the local stack's supervisor, compose and Kubernetes restart it).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from common.errors import TaskNotFound
from common.queue import MessageBuilder
from common.store import TaskStatus
from worker.jobs import JobContext, conclude
from worker.reaper import ReaperRules, overdue_error, rescue
from worker.watch import JobFlags, JobWatch

log = logging.getLogger("sdqueue.watchdog")

EXIT_HUNG = 75       # EX_TEMPFAIL: restart me
EXIT_GRACE = 30.0    # seconds the watchdog's own Redis and S3 writes may take before the process exits anyway


@dataclass(frozen=True)
class WatchdogLimits:
    """When a running job counts as hung."""

    time_limit: float
    margin: float
    stall_timeout: float      # 0: stalls are not watched

    @classmethod
    def from_settings(cls, settings) -> "WatchdogLimits":
        return cls(settings.tasks.time_limit, settings.workers.watchdog_margin, settings.workers.stall_timeout)


@dataclass(frozen=True)
class Hung:
    """A job the watchdog gives up on: `overdue` (failed) or stalled (resent)."""

    task_id: str
    attempt: int
    overdue: bool
    seconds: float            # how long it ran (overdue) or went without a step (stalled)


def find_hung(jobs: list[JobFlags], limits: WatchdogLimits, now: float) -> list[Hung]:
    """The jobs among `jobs` that are hung at monotonic time `now`."""
    hung = []
    for flags in jobs:
        if now - flags.started > (flags.time_limit or limits.time_limit) + limits.margin:
            hung.append(Hung(flags.task_id, flags.attempt, True, now - flags.started))
        elif limits.stall_timeout > 0 and not flags.setup and now - flags.touched > limits.stall_timeout:
            hung.append(Hung(flags.task_id, flags.attempt, False, now - flags.touched))
    return hung


class Watchdog(threading.Thread):
    """Daemon thread: calls `on_hung` once with the hung jobs, then stops watching."""

    def __init__(self, watch: JobWatch, limits: WatchdogLimits, on_hung: Callable[[list[Hung]], None],
                 interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        super().__init__(name="sdq-watchdog", daemon=True)
        self.watch, self.limits, self.on_hung = watch, limits, on_hung
        self.interval, self.clock = interval, clock
        self._stop_event = threading.Event()

    def check_once(self) -> list[Hung]:
        """Look at the running jobs once; `on_hung` hears of the hung ones."""
        hung = find_hung(self.watch.tracked(), self.limits, self.clock())
        if hung:
            self.on_hung(hung)
        return hung

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                if self.check_once():
                    return
            except Exception:  # noqa: BLE001 - the watchdog must outlive a Redis blip
                log.exception("watchdog check failed")

    def stop(self) -> None:
        self._stop_event.set()


def end_hung_jobs(ctx: JobContext, hung: list[Hung], exit_process: Callable[[int], None] = os._exit) -> None:
    """Fail the overdue jobs and resend the stalled ones, then exit the process (it is wedged).

    The exit is armed first, so a write that hangs too (the same outage)
    cannot keep the wedged process alive.
    """
    timer = threading.Timer(EXIT_GRACE, exit_process, args=(EXIT_HUNG,))
    timer.daemon = True
    timer.start()
    rules = ReaperRules.from_settings(ctx.settings)
    messages = MessageBuilder(ctx.celery)
    for job in hung:
        log.critical("task %s hung on worker %s: %s %.0f s; restarting the worker", job.task_id, ctx.info.id,
                     "running for" if job.overdue else "no progress for", job.seconds)
        try:
            if job.overdue:
                task = ctx.store.get(job.task_id)
                conclude(ctx, task, job.attempt, TaskStatus.FAILED,
                         {"error": overdue_error(rules, task.spec.time_limit)})
            else:
                for running in ctx.store.running([job.task_id]):
                    if running.worker == ctx.info.id and running.attempt == job.attempt:
                        rescue(ctx.store, messages, running, rules,
                               f"no step for {job.seconds:.0f} s on worker {ctx.info.id} (a hung GPU call or read)")
        except TaskNotFound:
            continue
        except Exception:  # noqa: BLE001 - the reaper rescues it once our heartbeat is gone
            log.exception("could not end hung task %s", job.task_id)
    try:
        ctx.workers.remove(ctx.info.id)   # the reaper takes this process's other jobs at once
    except Exception:  # noqa: BLE001 - the key expires by itself
        log.exception("could not remove the heartbeat")
    flush_logs()
    timer.cancel()
    exit_process(EXIT_HUNG)


def flush_logs() -> None:
    """What was logged reaches the log before a hard exit (os._exit skips logging's own shutdown)."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001
            pass
