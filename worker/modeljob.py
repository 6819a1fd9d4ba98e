"""An AWS-extension "model" made from its upload: a checkpoint archive unpacked S3 to S3 (the callbacks queue).

Why a task: the extension's clients upload a base model for training as a
`.tar` holding a `.safetensors` or `.ckpt` checkpoint (its create-model job
converted it on a SageMaker endpoint). Unpacking a multi-gigabyte archive
must not hold an API thread, and needs no GPU: the callbacks worker (a CPU
thread pool that never imports torch) runs it. The archive is read as a
stream (tarfile's "r|*" mode: plain or compressed) and the checkpoint's
bytes are uploaded as they are read, so neither is ever held whole in memory
or on disk.

What it makes: the model's checkpoint (an owned Stable-diffusion checkpoint
of the model's key, common/store/checkpoints.py) becomes Active holding
`{model name}.safetensors` (or `.ckpt`), and the model `Complete`; or the
model `Fail` with the reason (the archive is kept, so PUT /model Creating
may retry). A rerun after Complete changes nothing.
"""
from __future__ import annotations

import logging
import tarfile
from typing import Any

import redis

from common.catalog import WEIGHT_SUFFIXES
from common.errors import StorageError
from common.storage import owner_metadata
from common.store import ModelJob
from common.store.checkpoints import Checkpoint

log = logging.getLogger("sdqueue.worker")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class ModelProblem(Exception):
    """The upload cannot become a checkpoint; the message says why (shown as the model's error)."""


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def weights_name(model: ModelJob, member: str) -> str:
    """The checkpoint file's name: the model's name with the member's suffix (never a path from the archive)."""
    suffix = next(s for s in WEIGHT_SUFFIXES if member.lower().endswith(s))
    return f"{model.name}{suffix}"


class ReadOnly:
    """A stream that only reads: s3transfer uploads it in parts as it reads (a tar member's stream would claim
    to be seekable and fail when asked)."""

    def __init__(self, stream: Any):
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size)


def unpack_weights(ctx: Any, checkpoint: Checkpoint, model: ModelJob) -> str:
    """Stream the archive's first .safetensors/.ckpt file into the checkpoint; its file name there."""
    try:
        with tarfile.open(fileobj=ctx.storage.open_stream(checkpoint.key_of(model.upload)), mode="r|*") as archive:
            for member in archive:
                if member.isfile() and member.name.lower().endswith(WEIGHT_SUFFIXES):
                    name = weights_name(model, member.name)
                    ctx.storage.put_stream(checkpoint.key_of(name), ReadOnly(archive.extractfile(member)),
                                           owner_metadata(model.owner))
                    return name
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ModelProblem(f"{model.upload} is not a readable tar archive: {exc}") from exc
    raise ModelProblem(f"{model.upload} holds no {' or '.join(WEIGHT_SUFFIXES)} file")


def make_weights(ctx: Any, checkpoint: Checkpoint, model: ModelJob) -> str:
    """The checkpoint file the model is: unpacked from its archive, or the uploaded checkpoint itself."""
    if is_archive(model.upload):
        return unpack_weights(ctx, checkpoint, model)
    if not ctx.storage.exists(checkpoint.key_of(model.upload)):
        raise ModelProblem(f"{model.upload} was not uploaded")
    return model.upload


def finish_model(ctx: Any, model: ModelJob, status: str, error: str = "") -> None:
    """Record the model's ending (under its lock: PUT /model writes it too)."""
    store = ctx.model_jobs
    with store.lock(model.owner, model.id):
        current = store.get(model.owner, model.id) or model
        current.status, current.error = status, error
        store.save(current)


def activate(ctx: Any, checkpoint: Checkpoint, model: ModelJob, name: str) -> None:
    """The checkpoint holds the weights only, Active; the archive is deleted (best effort: it costs space only)."""
    with ctx.checkpoints.lock(checkpoint.id):
        current = ctx.checkpoints.get(checkpoint.id) or checkpoint
        current.names, current.status = [name], "Active"
        current.params = {**current.params, "model_id": model.id, "source": model.upload}
        ctx.checkpoints.save(current)
    if name != model.upload:
        try:
            ctx.storage.delete([checkpoint.key_of(model.upload)])
        except StorageError:
            log.warning("could not delete the archive %s of model %s", model.upload, model.id)


def create_model(ctx: Any, owner: str, model_id: str) -> str | None:
    """Make model `model_id` of `owner` from its upload; the status it ends in (None: no such model)."""
    model = ctx.model_jobs.get(owner, model_id)
    if model is None or model.status == "Complete":
        return model.status if model else None
    checkpoint = ctx.checkpoints.get(model.checkpoint_id)
    if checkpoint is None or checkpoint.owner != owner:
        finish_model(ctx, model, "Fail", "its upload's checkpoint record is gone")
        return "Fail"
    try:
        name = make_weights(ctx, checkpoint, model)
    except (ModelProblem, StorageError) as exc:
        log.warning("model %s failed: %s", model_id, exc)
        finish_model(ctx, model, "Fail", str(exc))
        return "Fail"
    except redis.RedisError:
        raise                                   # retried by the task
    except Exception as exc:  # noqa: BLE001 - any other failure ends the model, never leaves it Creating
        log.exception("model %s failed", model_id)
        finish_model(ctx, model, "Fail", f"{type(exc).__name__}: {exc}")
        return "Fail"
    activate(ctx, checkpoint, model, name)
    finish_model(ctx, model, "Complete")
    log.info("model %s is checkpoint %s (%s)", model_id, checkpoint.id, name)
    return "Complete"
