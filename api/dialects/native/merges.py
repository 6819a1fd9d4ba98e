"""The native API's model merges: /api/v1/merges (api/merges.py is the core).

Why tasks underneath: a merge is a task of the merge pool, so
GET /api/v1/tasks/{id}/events streams its progress (tensors merged), its
webhook gets the same events, and DELETE cancels it; these routes add the
merge's own view (inputs, method, the checkpoint it made). Another key's
merge is a 404, as a missing one.
"""
from __future__ import annotations

import time

from flask import url_for
from flask_smorest import abort

from api.auth import current_key
from api.dialects.native import schemas
from api.dialects.native.routes import SECURITY, blp, cancel_answer, submit_once
from api.limits import read_limited, submit_limited
from api.merges import MergeProblem, merge_inputs, owned_merge, produced_checkpoint, submit_merge
from api.services import Services, services
from common.store import Task, TaskStatus
from common.timestamps import iso

NOT_FOUND = "merge not found"
DTYPE_NAMES = {"keep": "keep", "float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def merge_body(svc: Services, task: Task) -> dict:
    """A merge as GET /api/v1/merges/{id} shows it."""
    merge = task.spec.merge or {}
    total = task.progress_total
    return {
        "id": task.id, "status": task.status.value, "inputs": merge_inputs(task), "method": merge.get("method"),
        "multiplier": merge.get("multiplier"), "dtype": DTYPE_NAMES.get(merge.get("dtype"), merge.get("dtype")),
        "family": merge.get("family"), "file": merge.get("file"), "checkpoint_id": merge.get("checkpoint_id"),
        "progress": {"step": task.progress_step, "total": total,
                     "fraction": round(task.progress_step / total, 4) if total else 0.0},
        "eta_seconds": task.eta(time.time()), "checkpoint": produced_checkpoint(task), "attempt": task.attempt,
        "error_message": task.error if task.status in (TaskStatus.FAILED, TaskStatus.CANCELLED) else None,
        "warnings": task.spec.meta.get("warnings", []), "queue_position": svc.store.queue_position(task),
        "created_at": iso(task.created_at), "updated_at": iso(task.updated_at),
        "events_url": url_for("native.task_events", task_id=task.id),
        "callback_status": task.callback_status if task.spec.callback_url else None,
    }


def owned_merge_or_404(svc: Services, task_id: str) -> Task:
    task = owned_merge(svc, current_key().owner, task_id)
    if task is None:
        abort(404, message=NOT_FOUND)
    return task


@blp.route("/merges", methods=["POST"])
@submit_limited
@blp.arguments(schemas.MergeCreateSchema(), location="json")
@blp.response(202, schemas.MergeSchema)
@blp.alt_response(403, description="This key may not use a model it names")
@blp.alt_response(422, description="A model that is unknown, of another family or unreadable, or a value the merge "
                                   "cannot take: the message names the field")
@blp.doc(security=SECURITY)
def create(data: dict):
    """Queue a model merge (weighted sum or add difference) on the merge pool; its result is this key's checkpoint.
    An Idempotency-Key header makes a retried submission answer with the merge the first one made."""
    svc = services()
    return submit_once(svc, lambda task_id: submit_merge(svc, current_key(), data, task_id),
                       lambda task_id: merge_body(svc, svc.store.get(task_id)), schemas.MergeSchema(), (MergeProblem,))


@blp.route("/merges", methods=["GET"])
@read_limited
@blp.arguments(schemas.PageQuery(), location="query")
@blp.response(200, schemas.MergeListSchema)
@blp.doc(security=SECURITY)
def list_merges(query: dict):
    """This key's merges, newest first (they are kept as long as tasks are: tasks.retention_seconds)."""
    svc = services()
    tasks, total = svc.store.list_merges(current_key().owner, query["offset"], query["limit"])
    return {"merges": [merge_body(svc, t) for t in tasks], "total": total, **query}


@blp.route("/merges/<string:task_id>", methods=["GET"])
@read_limited
@blp.response(200, schemas.MergeSchema)
@blp.doc(security=SECURITY)
def get_merge(task_id: str):
    """One merge: progress (tensors), and the checkpoint once completed."""
    svc = services()
    return merge_body(svc, owned_merge_or_404(svc, task_id))


@blp.route("/merges/<string:task_id>", methods=["DELETE"])
@submit_limited
@blp.response(200, schemas.MergeSchema)
@blp.alt_response(202, schema=schemas.MergeSchema, description="Cancel requested; it stops after its current tensor")
@blp.alt_response(409, description="The merge already completed or failed")
@blp.doc(security=SECURITY)
def cancel_merge(task_id: str):
    """Cancel a merge: at once while it waits, after its current tensor while it runs (no checkpoint is made)."""
    svc = services()
    return cancel_answer(svc, owned_merge_or_404(svc, task_id), lambda task: merge_body(svc, task), "merge")
