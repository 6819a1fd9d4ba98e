"""Everything sdqueue keeps in Redis, and the only code that talks to it.

Why one package: keys are named once (keys.py), the atomic transitions are
Lua files that receive every key through KEYS (lua/, loaded by scripts.py),
and each store owns one noun: tasks, worker heartbeats, pools, uploaded
checkpoints, A1111 per-key state, failed authentications, the AWS extension's training jobs and models. `open_stores` builds them all on one client.
Outside it, only libraries reach Redis on their own: Celery and kombu (the
broker; common/queue.py has kombu publish and read back its message
templates), Flask-Limiter (rate-limit counters), and dev/localstack.py (PING).
"""
from __future__ import annotations

from dataclasses import dataclass

from common.store.a1111 import A1111Store
from common.store.authfailures import AuthFailures
from common.store.checkpoints import CheckpointStore
from common.store.connection import redis_client
from common.store.datasets import Dataset, DatasetItem, DatasetStore
from common.store.pools import PoolRecord, PoolStore
from common.store.results import (EVENT_KINDS, FINAL_EVENTS, CancelOutcome, Claim, NoPick, Picked, Preview, Requeue,
                                  RequeueOutcome, RunningJob, TaskEvent)
from common.store.tasks import PRIORITIES, Task, TaskStatus, TaskStore
from common.store.trainjobs import ModelJob, OwnedRecords, TrainJob, model_job_store, train_job_store
from common.store.workers import WorkerInfo, WorkerRegistry, WorkerState

__all__ = ["A1111Store", "AuthFailures", "CancelOutcome", "Dataset", "DatasetItem", "DatasetStore", "EVENT_KINDS", "FINAL_EVENTS", "Preview", "TaskEvent", "CheckpointStore", "Claim", "ModelJob", "NoPick", "OwnedRecords", "PRIORITIES", "Picked", "PoolRecord",
           "PoolStore", "Requeue", "RequeueOutcome", "RunningJob", "Stores", "Task", "TaskStatus", "TaskStore", "TrainJob",
           "WorkerInfo", "WorkerRegistry", "WorkerState", "open_stores", "redis_client"]


@dataclass
class Stores:
    """The stores of one process, sharing one Redis client (and its connection pool)."""

    tasks: TaskStore
    workers: WorkerRegistry
    pools: PoolStore
    checkpoints: CheckpointStore
    a1111: A1111Store
    auth_failures: AuthFailures
    datasets: DatasetStore
    train_jobs: OwnedRecords[TrainJob]
    model_jobs: OwnedRecords[ModelJob]


def open_stores(url: str, retention_seconds: int, checkpoints_prefix: str = "models",
                datasets_prefix: str = "datasets") -> Stores:
    """Every store on one new client for `url`."""
    client = redis_client(url)
    return Stores(tasks=TaskStore(client, retention_seconds), workers=WorkerRegistry(client), pools=PoolStore(client),
                  checkpoints=CheckpointStore(client, checkpoints_prefix), a1111=A1111Store(client),
                  auth_failures=AuthFailures(client), datasets=DatasetStore(client, datasets_prefix),
                  train_jobs=train_job_store(client, retention_seconds), model_jobs=model_job_store(client))
