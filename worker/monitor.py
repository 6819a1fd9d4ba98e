"""The diffusers step callback: progress, cancellation and the time limit.

Why in the callback: it is the one place that runs between denoising steps.
Raising there aborts the run at once (no VAE decode of a half-done image)
and leaves the pipeline usable for the next job. It reads flags and records
progress in memory only: worker/watch.py does the Redis side in the
background, so no step waits on the network.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from common.errors import JobCancelled, JobTimeLimit, StaleAttempt
from worker.previews import Previewer
from worker.watch import JobFlags, JobWatch

log = logging.getLogger("sdqueue.worker")


class StepMonitor:
    """Callable for `callback_on_step_end`: progress, cancel, stale and time-limit checks."""

    def __init__(self, watch: JobWatch, task_id: str, attempt: int, time_limit: float, started: float | None = None):
        self.watch = watch
        self.flags: JobFlags = watch.track(task_id, attempt)
        self.task_id = task_id
        if started is not None:
            self.flags.started = self.flags.touched = started
        self.deadline = self.flags.started + time_limit
        self.time_limit = self.flags.time_limit = time_limit
        self.steps = 0
        self._batch, self._batches = 0, 1
        self.previewer: Previewer | None = None     # set when the job asked for previews (preview_every)

    def enter_setup(self) -> None:
        """Fetching files and loading a model: one long call each, bounded by the time limit, not by steps."""
        self.flags.setup = True

    def leave_setup(self) -> None:
        """Setup is over: from now on the watchdog expects steps (worker.stall_timeout)."""
        self.flags.setup = False
        self.flags.touch()

    def begin_batch(self, index: int, count: int) -> None:
        """Progress spans all batches of a job (A1111's n_iter), not just the running one."""
        self._batch, self._batches = index, count

    def close(self) -> None:
        """The job ended: the watcher stops polling it."""
        self.watch.untrack(self.flags)

    def __call__(self, pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        self.steps += 1
        per_batch = int(getattr(pipe, "num_timesteps", 0) or 0)
        done, total = self._batch * per_batch + step + 1, per_batch * self._batches
        self.on_step(done, total)
        self.offer_latents(pipe, kwargs.get("latents"), done, total)
        return kwargs

    def offer_latents(self, pipe: Any, latents: Any, step: int, total: int) -> None:
        """Make a preview of this job's latents when one is due (a failure costs the preview, never the job)."""
        if self.previewer is None or latents is None or not self.previewer.due(step):
            return
        try:
            self.flags.preview = self.previewer.render(pipe, latents, step, total)
        except Exception:  # noqa: BLE001 - previews are a courtesy
            log.exception("preview of task %s failed; no more previews for it", self.task_id)
            self.previewer = None

    def on_shared_step(self, step: int, total: int) -> None:
        """A step of a call this job shares with others (worker.generation.SharedStep): counted, then checked."""
        self.steps += 1
        self.on_step(step, total)

    def on_step(self, step: int, total: int) -> None:
        """Raise StaleAttempt / JobCancelled / JobTimeLimit to stop; else record the progress for the watcher."""
        if self.flags.stale:
            raise StaleAttempt(self.task_id)
        if self.flags.cancelled:
            raise JobCancelled(self.task_id)
        if time.monotonic() > self.deadline:
            raise JobTimeLimit(f"job exceeded the time limit of {self.time_limit:g} s")
        self.flags.progress = (step, total)
        self.flags.touch()
