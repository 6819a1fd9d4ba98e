"""A LoRA training job on the queue (JobSpec.training): an Enabled dataset in, an owned LoRA checkpoint out.

Why a job like any other: it is claimed, watched, cancelled, reaped and
finished by the same code as a generation job, so a training job has the
same states, events, webhooks and at-least-once guarantee. What differs:
- its own time limit (JobSpec.time_limit, training.time_limit), enforced by
  the step callback, the watchdog and the reaper alike;
- it survives a killed worker: every `checkpoint_every` steps the trainer's
  state (LoRA weights, optimizer, scheduler, RNG, losses) goes to S3 at
  `state_key`, and the next attempt, resent by the reaper, resumes from the
  newest one and ends with the configured step count (worker/training.py
  makes the resumed run's weights equal to an uninterrupted run's);
- its result is not images: the LoRA file is uploaded as a checkpoint of
  type Lora owned by the job's key (Active at once), so /inference/v2,
  native `loras` and A1111 `<lora:name>` tags of that key find it, and no
  other key does.
Progress carries the loss: the newest one and a capped loss curve
(LossCurve) are written with the step by the job watcher.
"""
from __future__ import annotations

import io
import logging
import math
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from PIL import Image

import redis

from common.errors import JobCancelled, JobHandedBack, ModelError, StaleAttempt
from common.storage import task_metadata
from common.store import Task, TaskStatus
from common.store.checkpoints import Checkpoint
from worker.assets import publish
from worker.monitor import StepMonitor
from worker.training import Example, TrainingConfig, TrainingState, save_lora_file, shrink_to_bucket, \
    state_from_bytes, state_to_bytes, train_lora

log = logging.getLogger("sdqueue.worker")


class LossCurve:
    """A loss curve of at most `points` points, [[step, mean loss], ...], kept as steps arrive.

    Why buckets that double: a 20 000-step run must not write 20 000 points
    on every progress write; averaging neighbours keeps the shape (and the
    noise is averaged out, as a plot would smooth it) at O(1) per step.
    """

    def __init__(self, points: int):
        self.points = max(points, 2)
        self.width = 1                           # steps per point
        self.curve: list[list[float]] = []       # [last step of the bucket, mean loss]
        self._sum, self._count = 0.0, 0
        self._last = 0                           # the newest step added

    def add(self, step: int, loss: float) -> None:
        self._last = step
        self._sum += loss
        self._count += 1
        if self._count == self.width:
            self.curve.append([step, round(self._sum / self._count, 6)])
            self._sum, self._count = 0.0, 0
            if len(self.curve) > self.points:
                self._halve()

    def _halve(self) -> None:
        """Merge neighbouring points: the bucket width doubles."""
        merged = [[b[0], round((a[1] + b[1]) / 2, 6)] for a, b in zip(self.curve[::2], self.curve[1::2])]
        if len(self.curve) % 2:
            self._sum, self._count = self.curve[-1][1] * self.width, self.width   # the odd one starts a bucket
        self.curve, self.width = merged, self.width * 2

    def snapshot(self) -> list[list[float]]:
        """The curve as it stands, a partly filled last bucket included."""
        if self._count:
            return [*self.curve, [self._last, round(self._sum / self._count, 6)]]
        return list(self.curve)


def training_config(spec_training: dict[str, Any]) -> TrainingConfig:
    """The job's hyper-parameters (validated by the API; TrainingConfig checks them again)."""
    return TrainingConfig(**spec_training["config"])


def load_examples(ctx: Any, examples: list[dict[str, str]], resolution: int) -> list[Example]:
    """The dataset's images (read from S3, as RGB, each shrunk at once to the size it trains at: a thousand
    16-megapixel photos must not sit decoded in memory) with their captions, in the dataset's order."""
    out = []
    for item in examples:
        try:
            image = Image.open(io.BytesIO(ctx.storage.get(item["key"])))
            image.load()
        except Exception as exc:  # noqa: BLE001 - a file removed or broken since the dataset was enabled
            raise ModelError(f"dataset file {item['key'].rsplit('/', 1)[-1]} cannot be read: {exc}") from exc
        original = (image.height, image.width)
        out.append(Example(shrink_to_bucket(image.convert("RGB"), resolution), item.get("caption") or "", original))
    return out


def load_state(ctx: Any, key: str) -> TrainingState | None:
    """The newest checkpoint an earlier attempt left in S3, or None to start from step 0."""
    if not ctx.storage.exists(key):
        return None
    try:
        state = state_from_bytes(ctx.storage.get(key))
    except ValueError:
        log.warning("training checkpoint %s is of another version; starting from step 0", key)
        return None
    log.info("resuming training from step %d (%s)", state.step, key)
    return state


def still_mine(ctx: Any, task_id: str, attempt: int) -> None:
    """Raise StaleAttempt (or JobCancelled) unless this attempt still holds the job, asked of Redis itself.

    Why not the watcher's flag: it lags by a poll interval, and an old attempt
    cut off from Redis keeps training; it must never overwrite the checkpoint
    a newer attempt resumes from, nor delete it, nor register the LoRA.
    """
    ctx.store.check_still_mine(task_id, attempt, ctx.info.id)


def holds(ctx: Any, task_id: str, attempt: int) -> bool:
    """Whether this attempt still holds the job (a cancelled one included): it may delete the job's files."""
    try:
        still_mine(ctx, task_id, attempt)
    except JobCancelled:
        return True
    except Exception:  # noqa: BLE001 - stale, or Redis unreachable: leave the files to whoever holds the job
        return False
    return True


def save_state(ctx: Any, task_id: str, attempt: int, key: str, state: TrainingState) -> None:
    """Upload a checkpoint (replacing the previous one), a rerun resumes from it; only while this attempt holds
    the job. An upload that fails is logged and training goes on: the next checkpoint may land, and losing one
    costs at most `checkpoint_every` steps on a resume, never the run."""
    still_mine(ctx, task_id, attempt)
    try:
        ctx.storage.put(key, state_to_bytes(state), "application/octet-stream", metadata=task_metadata(task_id))
    except Exception:  # noqa: BLE001 - S3 hiccup: the run is worth more than one checkpoint
        log.warning("could not upload training checkpoint %s at step %d; training goes on", key, state.step,
                    exc_info=True)


def drop_state(ctx: Any, task_id: str, attempt: int, key: str) -> None:
    """Delete a job's checkpoint once the job ends for good, unless another attempt holds the job now (a leftover
    costs space, never the job)."""
    if not holds(ctx, task_id, attempt):
        return
    try:
        ctx.storage.delete([key])
    except Exception:  # noqa: BLE001 - logged for the operator (a lifecycle rule on the prefix catches it)
        log.warning("could not delete training checkpoint %s", key)


def lora_checkpoint(ctx: Any, task: Task) -> Checkpoint:
    """The LoRA's checkpoint record; its id derives from the task, so a retried finish writes the same one."""
    checkpoint_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdqueue-training:{task.id}"))
    training = task.spec.training or {}
    params = {"training_job": task.id, "base_model": task.spec.model, "family": task.spec.family or "",
              "dataset": training.get("dataset", ""), "trigger_word": training["config"].get("trigger_word", ""),
              "created_by": "training"}
    return ctx.checkpoints.new("Lora", [f"{training['lora_name']}.safetensors"], params, task.owner,
                               checkpoint_id=checkpoint_id, status="Active")


def publish_lora(ctx: Any, task: Task, result: Any) -> Checkpoint:
    """Write the LoRA file, upload it, and record it as the key's Active Lora checkpoint."""
    checkpoint = lora_checkpoint(ctx, task)
    name = checkpoint.names[0]
    with tempfile.TemporaryDirectory(prefix="sdq-lora-") as folder:
        publish(ctx.storage, ctx.checkpoints, checkpoint, save_lora_file(result, Path(folder) / name), task.id)
    return checkpoint


class TrainingProgress:
    """train_lora's on_step: the job's step callback (cancel, time limit, stale) plus its loss, and the hand-back
    of a worker that is stopping (`stopping` set by a warm shutdown: the step's checkpoint is saved first)."""

    def __init__(self, monitor: StepMonitor, curve_points: int, earlier: list[float],
                 stopping: threading.Event | None = None):
        self.monitor = monitor
        self.stopping = stopping or threading.Event()
        self.curve = LossCurve(curve_points)
        for step, loss in enumerate(earlier, 1):   # a resumed run's curve starts with the steps already made
            self.curve.add(step, loss)

    def __call__(self, step: int, total: int, loss: float) -> None:
        if self.monitor.flags.setup:               # the dataset is encoded: steps are watched from now on
            self.monitor.leave_setup()
        if not math.isfinite(loss):
            raise ModelError(f"the loss became {loss} at step {step}: training diverged (lower learning_rate, or "
                             f"train in bf16 where the GPU has it)")
        self.curve.add(step, loss)
        flags = self.monitor.flags
        flags.loss, flags.loss_curve = loss, self.curve.snapshot()
        self.monitor.steps += 1
        self.monitor.on_step(step, total)          # raises to stop: cancelled, over time, or no longer ours
        if self.stopping.is_set() and step < total:
            raise JobHandedBack(f"the worker is stopping; checkpoint saved at step {step}")


def run_training_job(ctx: Any, task: Task, monitor: StepMonitor) -> tuple[TaskStatus, dict]:
    """Train the job's LoRA on its base model (resuming from S3 when an earlier attempt checkpointed) and
    register it; the job's ending as a status and fields. Cancels and time limits propagate to the caller."""
    from worker.jobs import warm_pipeline

    spec, training, attempt = task.spec, task.spec.training or {}, monitor.flags.attempt
    config = training_config(training)
    state_key = training["state_key"]
    monitor.enter_setup()
    try:
        examples = load_examples(ctx, training["examples"], config.resolution)
        resume = load_state(ctx, state_key)
    finally:
        monitor.leave_setup()
    pipe = warm_pipeline(ctx, spec.model, spec.assets, [monitor])
    progress = TrainingProgress(monitor, ctx.settings.training.curve_points, resume.losses if resume else [],
                                ctx.stopping)
    started = time.perf_counter()
    monitor.enter_setup()                          # encoding the dataset makes no steps; the first step ends it
    try:
        result = train_lora(pipe, examples, config, on_step=progress, resume=resume,
                            save_state=lambda state: save_state(ctx, task.id, attempt, state_key, state),
                            checkpoint_now=ctx.stopping.is_set)
    except (StaleAttempt, redis.RedisError):       # JobHandedBack too: the next attempt resumes from the checkpoint
        raise                                      # another attempt runs (or will run) on: it needs the checkpoint
    except BaseException:
        drop_state(ctx, task.id, attempt, state_key)   # cancelled, over time or failed: the job ends for good
        raise
    compute = time.perf_counter() - started
    try:
        still_mine(ctx, task.id, attempt)          # a stale attempt registers nothing
    except JobCancelled:
        drop_state(ctx, task.id, attempt, state_key)
        raise
    checkpoint = publish_lora(ctx, task, result)
    drop_state(ctx, task.id, attempt, state_key)   # done: the LoRA replaces the checkpoint
    lora = {"name": training["lora_name"], "file": checkpoint.names[0], "checkpoint_id": checkpoint.id,
            "s3_location": ctx.storage.s3_uri(checkpoint.key_of(checkpoint.names[0])),
            "resumed_from_step": resume.step if resume else 0}
    return TaskStatus.COMPLETED, {
        "result": {"lora": lora}, "loss": repr(result.losses[-1]), "loss_curve": progress.curve.snapshot(),
        "progress_step": config.max_steps, "progress_total": config.max_steps, "compute_seconds": f"{compute:.6f}"}
