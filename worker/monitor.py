"""The diffusers step callback: progress, cancellation and the time limit.

Why in the callback: it is the one place that runs between denoising steps.
Raising there aborts the run at once (no VAE decode of a half-done image)
and leaves the pipeline usable for the next job.
"""
from __future__ import annotations

import time
from typing import Any

from common.errors import JobTimeLimit
from common.store.tasks import TaskStore


class StepMonitor:
    """Callable for `callback_on_step_end`: throttled progress, cancel and stale checks."""

    def __init__(self, store: TaskStore, task_id: str, attempt: int, worker: str, time_limit: float,
                 progress_interval: float, started: float | None = None):
        self.store = store
        self.task_id = task_id
        self.attempt = attempt
        self.worker = worker
        self.deadline = (started or time.monotonic()) + time_limit
        self.time_limit = time_limit
        self.interval = progress_interval
        self._last_write = 0.0
        self.steps = 0
        self._batch, self._batches = 0, 1

    def restart_clock(self) -> None:
        """Start the time limit now (after fetching model files, which is not generation)."""
        self.deadline = time.monotonic() + self.time_limit

    def begin_batch(self, index: int, count: int) -> None:
        """Progress spans all batches of a job (A1111's n_iter), not just the running one."""
        self._batch, self._batches = index, count

    def __call__(self, pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        self.steps += 1
        per_batch = int(getattr(pipe, "num_timesteps", 0) or 0)
        self.on_step(self._batch * per_batch + step + 1, per_batch * self._batches)
        return kwargs

    def on_shared_step(self, step: int, total: int) -> None:
        """A step of a call this job shares with others (worker.generation.SharedStep): counted, then checked."""
        self.steps += 1
        self.on_step(step, total)

    def on_step(self, step: int, total: int) -> None:
        """Raise JobCancelled / StaleAttempt / JobTimeLimit to stop; else maybe record progress."""
        self.store.check_still_mine(self.task_id, self.attempt, self.worker)
        now = time.monotonic()
        if now > self.deadline:
            raise JobTimeLimit(f"job exceeded the time limit of {self.time_limit:g} s")
        if now - self._last_write >= self.interval or step >= total:
            self.store.report_progress(self.task_id, step, total)
            self._last_write = now
