"""What the step callback needs from Redis, kept fresh by one thread: cancel and stale flags, progress writes.

Why: the step callback runs between denoising steps; a Redis round trip
there (to learn of a cancel, or to write progress) stalls the GPU on the
network at every step. This thread polls the running jobs' hash fields and
writes their latest progress every `tasks.progress_interval` seconds, in the
background; the callback only reads and sets plain attributes. A cancel is
seen within one interval; a job cancelled before it started is caught by
the check made before generation.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from typing import Callable

from common.errors import JobCancelled, StaleAttempt
from common.events import preview_data, progress_data
from common.store import Claim, TaskStore
from worker.previews import RawPreview, encode_preview

log = logging.getLogger("sdqueue.worker")


@dataclass
class JobFlags:
    """One running job as the step callback sees it."""

    task_id: str
    attempt: int
    cancelled: bool = False
    stale: bool = False                       # a newer attempt, or another worker, owns the job now
    progress: tuple[int, int] | None = None   # (step, total) the callback reached
    written: tuple[int, int] | None = None    # what the watcher last wrote
    started: float = field(default_factory=time.monotonic)   # when the job's time limit started
    touched: float = field(default_factory=time.monotonic)   # its last sign of progress (worker/watchdog.py)
    setup: bool = False                       # fetching files or loading a model: no steps to watch
    preview: RawPreview | None = None         # the newest preview the callback made (worker/previews.py)
    preview_sent: RawPreview | None = None    # the one the watcher last wrote
    webhook_events: frozenset = frozenset()   # of progress / preview: what the job's webhook gets (callback_events)
    time_limit: float = 0.0                   # the job's own limit (a training job's); 0: tasks.time_limit
    loss: float | None = None                 # a training job's latest loss (worker/trainingjob.py)
    loss_curve: list | None = None            # its loss curve so far, [[step, loss], ...] (capped)

    def touch(self) -> None:
        """A sign of life from the job's thread: a step, or the end of a phase."""
        self.touched = time.monotonic()


class JobWatch(threading.Thread):
    """Daemon thread: one Redis pipeline per interval for every running job of this worker process."""

    def __init__(self, store: TaskStore, worker_id: str, interval: float, preview_size: int = 256,
                 preview_format: str = "jpeg"):
        super().__init__(name="sdq-job-watch", daemon=True)
        self.store = store
        self.worker_id = worker_id
        self.interval = max(interval, 0.01)
        self.preview_size = preview_size
        self.preview_format = preview_format
        self.notify: Callable[[str, str, dict], None] | None = None   # (task id, kind, data): a webhook event
        self._jobs: dict[str, JobFlags] = {}
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def track(self, task_id: str, attempt: int) -> JobFlags:
        flags = JobFlags(task_id, attempt)
        with self._lock:
            self._jobs[task_id] = flags
        return flags

    def tracked(self) -> list[JobFlags]:
        """The jobs this process is running now (for the watchdog and the heartbeat)."""
        with self._lock:
            return list(self._jobs.values())

    def untrack(self, flags: JobFlags) -> None:
        with self._lock:
            if self._jobs.get(flags.task_id) is flags:
                del self._jobs[flags.task_id]

    def poll_once(self) -> None:
        """Refresh every tracked job's flags from its hash, and write the progress it made since."""
        jobs = self.tracked()
        if not jobs:
            return
        claims = [Claim(f.task_id, f.attempt) for f in jobs]
        for flags, problem in zip(jobs, self.store.still_mine(claims, self.worker_id)):
            if isinstance(problem, StaleAttempt):
                flags.stale = True
                continue
            flags.cancelled = isinstance(problem, JobCancelled)
            progress, raw = flags.progress, flags.preview
            fresh = raw if raw is not None and raw is not flags.preview_sent else None
            if progress is not None and (progress != flags.written or fresh is not None):
                preview = encode_preview(fresh, self.preview_size, self.preview_format) if fresh else None
                loss = flags.loss
                written = self.store.report_progress(flags.task_id, flags.attempt, self.worker_id, *progress,
                                                     preview=preview, loss=loss, loss_curve=flags.loss_curve)
                flags.written, flags.preview_sent = progress, raw
                if written and flags.webhook_events and self.notify is not None:
                    self.send_webhook_events(flags, progress, written.eta, preview, loss)

    def send_webhook_events(self, flags: JobFlags, progress: tuple[int, int], eta: str, preview,
                            loss: float | None = None) -> None:
        """The progress (and preview) just written, to the job's webhook when it asked for them."""
        if "progress" in flags.webhook_events:
            self.notify(flags.task_id, "progress", progress_data(flags.task_id, *progress, eta, loss))
        if preview is not None and "preview" in flags.webhook_events:
            self.notify(flags.task_id, "preview", preview_data(flags.task_id, preview))

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - a Redis blip must not end the thread; flags stay as they were
                log.exception("job watch failed")

    def stop(self) -> None:
        self._stop_event.set()
