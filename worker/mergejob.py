"""A model merge on the queue (JobSpec.merge): two or three checkpoints in, the key's own checkpoint out.

Why a job like any other: it is claimed, watched, cancelled, reaped and
finished by the same code as a generation job, so a merge has the same
states, events and webhooks. What differs:
- its inputs are files, not a warm pipeline: a catalog model that is a
  diffusers folder is converted to one original-layout file first
  (worker/singlefile.py), a single file is read in place, and the key's
  own checkpoints are fetched from S3 into the model directory as a
  generation job fetches them (worker/assets.py);
- its steps are tensors: worker/merge.py reports each one to the job's
  StepMonitor, so progress, cancel, the time limit (merge.time_limit) and
  the watchdog work as for denoising steps; fetching, converting, writing
  and uploading are setup;
- its result is a checkpoint of type Stable-diffusion owned by the job's
  key (Active at once, its id chosen by the API from the task), so the
  key's /inference/v2 jobs and later merges find it by its file name and no
  other key does.
Scratch files live in a hidden folder of the model directory (the catalog
skips dot names): the same disk as the models, removed when the job ends.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from common.catalog import find_model, owned_dir
from common.errors import ModelError
from common.store import Task, TaskStatus
from common.store.checkpoints import Checkpoint
from worker.assets import asset_dirs, ensure_assets, publish
from worker.merge import MergeError, merge_tensors, write_merged
from worker.monitor import StepMonitor
from worker.singlefile import write_single_file_checkpoint

log = logging.getLogger("sdqueue.worker")

KIND = "Stable-diffusion"


def input_path(ctx: Any, item: dict[str, Any], scratch: Path) -> Path:
    """The single .safetensors file of one input: the key's checkpoint fetched into the model directory, a catalog
    single file as it is, a catalog diffusers folder converted into `scratch`."""
    settings = ctx.settings
    if item["source"] == "checkpoint":
        ensure_assets(ctx.storage, [item["asset"]], asset_dirs(settings))
        return owned_dir(settings.models_dir) / item["asset"]["name"]
    model = find_model(settings.models_dir, item["model"], settings.models.overrides)
    if model is None:
        raise ModelError(f"{item['role']}: model {item['model']!r} is not in the model directory")
    if model.kind != "diffusers":
        return model.path
    converted = scratch / f"{item['role']}.safetensors"
    log.info("converting %s to a single file for the merge", model.name)
    write_single_file_checkpoint(model.path, converted)
    return converted


class MergeProgress:
    """merge_tensors' on_tensor: the job's step callback (progress, cancel, time limit, stale) per tensor."""

    def __init__(self, monitor: StepMonitor):
        self.monitor = monitor

    def __call__(self, done: int, total: int) -> None:
        self.monitor.steps += 1
        self.monitor.on_step(done, total)          # raises to stop: cancelled, over time, or no longer ours


def merged_checkpoint(ctx: Any, task: Task) -> Checkpoint:
    """The merge's checkpoint record (its id chosen by the API from the task: a retried finish writes the same)."""
    merge = task.spec.merge or {}
    checkpoint_id = merge["checkpoint_id"]
    params = {"merge_job": task.id, "method": merge["method"], "multiplier": merge["multiplier"],
              "inputs": {item["role"]: item["name"] for item in merge["inputs"]}, "family": merge["family"],
              "dtype": merge["dtype"], "created_by": "merge"}
    return ctx.checkpoints.new(KIND, [merge["file"]], params, task.owner, checkpoint_id=checkpoint_id, status="Active")


def publish_checkpoint(ctx: Any, task: Task, path: Path) -> Checkpoint:
    """Upload the merged file and record it as the key's Active Stable-diffusion checkpoint."""
    checkpoint = merged_checkpoint(ctx, task)
    publish(ctx.storage, ctx.checkpoints, checkpoint, path, task.id)
    return checkpoint


def run_merge_job(ctx: Any, task: Task, monitor: StepMonitor) -> tuple[TaskStatus, dict]:
    """Merge the job's inputs, upload and register the result; the job's ending as a status and fields. Cancels and
    time limits propagate to the caller; a merge the files cannot make (shapes differ) is a ModelError."""
    merge = task.spec.merge or {}
    inputs = {item["role"]: item for item in merge["inputs"]}
    folder = ctx.settings.models_dir
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder, prefix=".merge-") as scratch:
        monitor.enter_setup()
        try:
            paths = {role: input_path(ctx, item, Path(scratch)) for role, item in inputs.items()}
        finally:
            monitor.leave_setup()
        try:
            merged = merge_tensors(paths["primary"], paths["secondary"], paths.get("tertiary"), merge["method"],
                                   merge["multiplier"], on_tensor=MergeProgress(monitor))
            monitor.enter_setup()                  # writing and uploading make no steps
            out = write_merged(merged, Path(scratch) / merge["file"], merge["dtype"])
        except MergeError as exc:
            raise ModelError(str(exc)) from exc
        report, total = merged.report, len(merged.tensors)
        del merged                                 # the file holds it now
        ctx.store.check_still_mine(task.id, monitor.flags.attempt, ctx.info.id)   # a stale attempt registers nothing
        checkpoint = publish_checkpoint(ctx, task, out)
        size = out.stat().st_size
    name = checkpoint.names[0]
    view = {"name": name, "checkpoint_id": checkpoint.id, "s3_location": ctx.storage.s3_uri(checkpoint.key_of(name)),
            "family": merge["family"], "size_bytes": size, "tensors_merged": report.merged,
            "kept_from_primary": len(report.kept_from_primary)}
    return TaskStatus.COMPLETED, {"result": {"checkpoint": view}, "progress_step": total, "progress_total": total,
                                  "compute_seconds": f"{time.perf_counter() - started:.6f}"}
