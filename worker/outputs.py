"""The output stage: encoding, uploads, side files and the finish of a job, off the GPU's critical path.

Why: PNG encoding (tens of ms per 512² image, more at 1024²), S3 PUTs and the
finish's Redis calls used to run between two pipeline calls, with the GPU
idle. One background thread now does them while the GPU runs the next job.
It is bounded (`worker.output_depth` jobs wait for it at most; the GPU
thread blocks beyond that), so memory held by finished images stays small.
Nothing is lost when it fails: an error fails the job cleanly (a job is
never marked completed without its objects); a Redis blip is retried; if
the process dies, the job is still `processing` under a dead worker and the
reaper runs it again. Redis errors are retried until Redis answers (the
job's ending needs it), so an outage strands nothing.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import redis

log = logging.getLogger("sdqueue.worker")
RETRY_PAUSE = 1.0          # seconds before the first retry after a Redis error, doubled each time
MAX_RETRY_PAUSE = 30.0     # a Redis outage is waited out (the jobs' endings need Redis anyway)


class OutputStage:
    """One daemon thread running submitted work in order; `on_crash(exc)` ends a job whose work failed."""

    def __init__(self, depth: int = 1, retry_pause: float = RETRY_PAUSE):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._held: list[str] = []        # labels submitted and not yet done (waiting or running)
        self._held_lock = threading.Lock()
        self.retry_pause = retry_pause
        self._thread = threading.Thread(target=self._run, name="sdq-outputs", daemon=True)
        self._thread.start()

    def submit(self, label: str, work: Callable[[], None], on_crash: Callable[[BaseException], None]) -> None:
        """Queue a job's remaining work; blocks while `depth` jobs are already waiting."""
        with self._held_lock:
            self._held.append(label)
        self._queue.put((label, work, on_crash))

    def held(self) -> list[str]:
        """Labels (task ids) whose work is waiting or running: jobs this process still owes an ending."""
        with self._held_lock:
            return list(self._held)

    @property
    def full(self) -> bool:
        """Whether `depth` jobs already wait, so the next submit blocks (the GPU thread waits for the stage)."""
        return self._queue.full()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted work has run (a warm shutdown); False if `timeout` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _run(self) -> None:
        while True:
            label, work, on_crash = self._queue.get()
            try:
                self._do(label, work, on_crash)
            finally:
                with self._held_lock:
                    self._held.remove(label)
                self._queue.task_done()

    def _do(self, label: str, work: Callable[[], None], on_crash: Callable[[BaseException], None]) -> None:
        pause = self.retry_pause
        while True:
            try:
                work()
                return
            except redis.RedisError as exc:
                log.warning("outputs of %s: Redis error (%s); retrying in %.0f s", label, exc, pause)
                time.sleep(pause)
                pause = min(pause * 2, MAX_RETRY_PAUSE)
            except Exception as exc:  # noqa: BLE001 - the job fails; the stage goes on with the next
                failure: BaseException = exc
                break
        log.error("outputs of %s failed: %s", label, failure, exc_info=failure)
        try:
            on_crash(failure)
        except Exception:  # noqa: BLE001 - nothing more can be done here; the reaper rescues it if the worker dies
            log.exception("could not end %s after its outputs failed", label)
