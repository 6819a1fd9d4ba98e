"""The native API's LoRA training jobs: /api/v1/trainings (api/trainings.py is the core).

Why tasks underneath: a training job is a task of the training pool, so
GET /api/v1/tasks/{id}/events streams its progress (with the loss), its
webhook gets the same events, and DELETE cancels it; these routes add the
training's own view (hyper-parameters, loss curve, the LoRA it made).
Another key's training job is a 404, as a missing one.
"""
from __future__ import annotations

import time

from flask import url_for
from flask_smorest import abort

from api.auth import current_key
from api.dialects.native import schemas
from api.dialects.native.routes import SECURITY, blp, cancel_answer, submit_once
from api.limits import read_limited, submit_limited
from api.services import Services, services
from api.trainings import TrainingProblem, owned_training, produced_lora, submit_training
from common.store import Task, TaskStatus
from common.timestamps import iso

NOT_FOUND = "training job not found"


def training_body(svc: Services, task: Task) -> dict:
    """A training job as GET /api/v1/trainings/{id} shows it."""
    training = task.spec.training or {}
    total = task.progress_total or training.get("config", {}).get("max_steps", 0)
    return {
        "id": task.id, "status": task.status.value, "dataset": training.get("dataset"), "model": task.spec.model,
        "lora_name": training.get("lora_name"), "config": training.get("config", {}),
        "progress": {"step": task.progress_step, "total": total,
                     "fraction": round(task.progress_step / total, 4) if total else 0.0},
        "eta_seconds": task.eta(time.time()), "loss": task.loss, "loss_curve": task.loss_curve,
        "lora": lora_view(svc, produced_lora(task)), "attempt": task.attempt,
        "error_message": task.error if task.status in (TaskStatus.FAILED, TaskStatus.CANCELLED) else None,
        "warnings": task.spec.meta.get("warnings", []), "queue_position": svc.store.queue_position(task),
        "created_at": iso(task.created_at), "updated_at": iso(task.updated_at),
        "events_url": url_for("native.task_events", task_id=task.id),
        "callback_status": task.callback_status if task.spec.callback_url else None,
    }


def lora_view(svc: Services, lora: dict | None) -> dict | None:
    """The LoRA a training made, with a presigned URL to download its file (None once the key deleted it)."""
    if lora is None:
        return None
    checkpoint = svc.checkpoints.get(lora["checkpoint_id"])
    url = svc.storage.url_for(checkpoint.key_of(lora["file"])) if checkpoint is not None else None
    return {**lora, "download_url": url}


def owned_training_or_404(svc: Services, task_id: str) -> Task:
    task = owned_training(svc, current_key().owner, task_id)
    if task is None:
        abort(404, message=NOT_FOUND)
    return task


@blp.route("/trainings", methods=["POST"])
@submit_limited
@blp.arguments(schemas.TrainingCreateSchema(), location="json")
@blp.response(202, schemas.TrainingSchema)
@blp.alt_response(404, description="No Enabled dataset of this key has that name")
@blp.alt_response(409, description="The dataset is not Enabled yet")
@blp.alt_response(422, description="A value the service cannot train with: the message names the field")
@blp.doc(security=SECURITY)
def create(data: dict):
    """Queue a LoRA training job on the training pool; poll it here or stream GET /api/v1/tasks/{id}/events.
    An Idempotency-Key header makes a retried submission answer with the job the first one made."""
    svc = services()
    return submit_once(svc, lambda task_id: submit_training(svc, current_key(), data, task_id),
                       lambda task_id: training_body(svc, svc.store.get(task_id)), schemas.TrainingSchema(),
                       (TrainingProblem,))


@blp.route("/trainings", methods=["GET"])
@read_limited
@blp.arguments(schemas.PageQuery(), location="query")
@blp.response(200, schemas.TrainingListSchema)
@blp.doc(security=SECURITY)
def list_trainings(query: dict):
    """This key's training jobs, newest first (they are kept as long as tasks are: tasks.retention_seconds)."""
    svc = services()
    tasks, total = svc.store.list_trainings(current_key().owner, query["offset"], query["limit"])
    return {"trainings": [training_body(svc, t) for t in tasks], "total": total, **query}


@blp.route("/trainings/<string:task_id>", methods=["GET"])
@read_limited
@blp.response(200, schemas.TrainingSchema)
@blp.doc(security=SECURITY)
def get_training(task_id: str):
    """One training job: progress, ETA, loss and loss curve, and the LoRA once completed."""
    svc = services()
    return training_body(svc, owned_training_or_404(svc, task_id))


@blp.route("/trainings/<string:task_id>", methods=["DELETE"])
@submit_limited
@blp.response(200, schemas.TrainingSchema)
@blp.alt_response(202, schema=schemas.TrainingSchema, description="Cancel requested; it stops after its current step")
@blp.alt_response(409, description="The job already completed or failed")
@blp.doc(security=SECURITY)
def cancel_training(task_id: str):
    """Cancel a training job: at once while it waits, after its current step while it runs (no LoRA is made)."""
    svc = services()
    return cancel_answer(svc, owned_training_or_404(svc, task_id), lambda task: training_body(svc, task),
                         "training job")
