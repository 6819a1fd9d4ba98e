"""What the API process holds for its life: settings, store, storage, queue, catalog.

Why one object: create_app builds it once from settings and every view
(and every schema bound) reaches it through `services()` at request time;
nothing is global at import time.
"""
from __future__ import annotations

import time
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from flask import current_app

from api.auth import KeyRing
from api.waiter import EventHub
from common.catalog import ModelInfo, list_loras, list_models, pick_default
from common.queue import MessageBuilder
from common.storage import Storage
from common.store import (A1111Store, CheckpointStore, DatasetStore, ModelJob, OwnedRecords, PoolStore, TaskStore,
                          TrainJob, WorkerRegistry)

CATALOG_TTL = 2.0


@dataclass
class Catalog:
    """Models and LoRAs on disk, re-read at most every CATALOG_TTL seconds."""

    models_dir: Path
    lora_dir: Path
    configured_default: str
    overrides: dict = field(default_factory=dict)   # models.overrides
    _at: float = 0.0
    _models: list[ModelInfo] = field(default_factory=list)
    _loras: dict[str, Path] = field(default_factory=dict)

    def _refresh(self) -> None:
        if time.monotonic() - self._at > CATALOG_TTL:
            self._models = list_models(self.models_dir, self.overrides)
            self._loras = list_loras(self.lora_dir)
            self._at = time.monotonic()

    def refresh_now(self) -> None:
        """Re-read the directories on the next lookup (A1111's refresh-checkpoints)."""
        self._at = 0.0

    def models(self) -> list[ModelInfo]:
        self._refresh()
        return self._models

    def model(self, name: str) -> ModelInfo | None:
        return next((m for m in self.models() if m.name == name), None)

    def default_model(self) -> str | None:
        self._refresh()
        return pick_default(self.configured_default, self._models)

    def loras(self) -> dict[str, Path]:
        self._refresh()
        return self._loras


@dataclass
class Services:
    settings: Any
    store: TaskStore
    workers: WorkerRegistry
    pools: PoolStore
    checkpoints: CheckpointStore
    a1111: A1111Store
    storage: Storage
    celery: Celery
    messages: MessageBuilder
    keys: KeyRing
    catalog: Catalog
    waits: EventHub
    datasets: DatasetStore | None = None
    train_jobs: OwnedRecords[TrainJob] | None = None      # the AWS extension's training jobs (POST /train)
    model_jobs: OwnedRecords[ModelJob] | None = None      # and its base models for training (POST /model)


_serving: ContextVar[Services | None] = ContextVar("sdq_services", default=None)


def services() -> Services:
    """The services of the app serving this request (Flask's app context, or api/fastsubmit.py's)."""
    return _serving.get() or current_app.extensions["sdq"]


def serve_with(svc: Services) -> Token:
    """Make `services()` answer `svc` outside Flask (the fast submission path); undo with `done_serving`."""
    return _serving.set(svc)


def done_serving(token: Token) -> None:
    _serving.reset(token)
