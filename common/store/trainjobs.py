"""The AWS SD extension's training jobs and "models" (its base models for training), recorded in Redis.

Why records of their own: the extension creates a training job in `Initial`
(POST /train) and starts it later (PUT /train), so a job exists before its
task does; and a "model" (POST /model) is an upload that becomes an owned
Stable-diffusion checkpoint once a callbacks worker has extracted it
(worker/modeljob.py). Both are one JSON value per record under the key that
created it, plus a per-key index by creation time: another key's id does
not exist for anyone else (the same answers as a missing one).

Training job records expire `tasks.retention_seconds` after their last
write, before the task they started (whose last change comes later); model
records are kept, as the checkpoints they name are.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Generic, TypeVar

import redis

from common.store import keys

MODEL_STATUSES = ("Initial", "Creating", "Complete", "Fail")    # the extension's CreateModelStatus
TRAIN_STATUSES = ("Initial", "Training", "Complete", "Fail")    # the extension's TrainJobStatus (its first API)


@dataclass
class TrainJob:
    """A training job as POST /train made it: what to train (the native training request) and the echo."""

    id: str
    owner: str
    train_type: str
    params: dict[str, Any]                   # the request's params as the extension stores them (echoed)
    request: dict[str, Any]                  # api.trainings' request: dataset, lora_name, epochs, rank, ...
    base: dict[str, str]                     # {"model": catalog name} or {"checkpoint_id", "file"}: an owned upload
    model_id: str = ""
    lora_train_type: str = "dreambooth"
    input_location: str = ""
    created: float = field(default_factory=time.time)
    submitted_at: float | None = None        # when PUT /train queued its task (the task id is the job id)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ModelJob:
    """A base model for training: an upload being made into an owned checkpoint, or a reference to one."""

    id: str
    owner: str
    name: str
    model_type: str
    params: dict[str, Any]
    status: str = "Initial"
    checkpoint_id: str = ""                  # the owned checkpoint holding (or to hold) its weights
    catalog_model: str = ""                  # or: a model of the model directory
    filename: str = ""                       # the uploaded file's name on the client's side (its part tags' key)
    upload: str = ""                         # its name in the checkpoint (a .tar, or the weights already)
    error: str = ""
    created: float = field(default_factory=time.time)


Record = TypeVar("Record", TrainJob, ModelJob)


class OwnedRecords(Generic[Record]):
    """JSON records of one kind, each under its owner, indexed per owner by creation time."""

    def __init__(self, client: redis.Redis, record: Callable[..., str], index: Callable[..., str],
                 kind: type[Record], ttl: int | None = None):
        self.client, self.record, self.index, self.kind, self.ttl = client, record, index, kind, ttl

    @staticmethod
    def new_id() -> str:
        return str(uuid.uuid4())

    def save(self, item: Record) -> None:
        pipe = self.client.pipeline()
        pipe.set(self.record(item.owner, item.id), json.dumps(asdict(item)), ex=self.ttl)
        pipe.zadd(self.index(item.owner), {item.id: item.created})
        pipe.execute()

    def get(self, owner: str, item_id: str) -> Record | None:
        """`owner`'s record `item_id`; None when it has none (whoever else has one of that id)."""
        raw = self.client.get(self.record(owner, item_id))
        return self.kind(**json.loads(raw)) if raw else None

    def owned(self, owner: str) -> list[Record]:
        """`owner`'s records, newest first; ids whose record expired leave the index."""
        ids = self.client.zrevrange(self.index(owner), 0, -1)
        values = self.client.mget([self.record(owner, i) for i in ids]) if ids else []
        gone = [i for i, v in zip(ids, values) if v is None]
        if gone:
            self.client.zrem(self.index(owner), *gone)
        return [self.kind(**json.loads(v)) for v in values if v]

    def lock(self, owner: str, item_id: str) -> Any:
        """One writer per record at a time (a client retrying a PUT races itself)."""
        return self.client.lock(keys.EXTENSION_LOCK(owner, item_id), timeout=900, blocking_timeout=30)


def train_job_store(client: redis.Redis, retention_seconds: int) -> OwnedRecords[TrainJob]:
    return OwnedRecords(client, keys.TRAIN_JOB, keys.TRAIN_JOBS, TrainJob, ttl=retention_seconds or None)


def model_job_store(client: redis.Redis) -> OwnedRecords[ModelJob]:
    return OwnedRecords(client, keys.MODEL_JOB, keys.MODEL_JOBS, ModelJob)
