"""The native API: /api/v1/generate, tasks, models, schedulers, LoRAs.

Why a thin translator: the request is validated by its schema, turned into
the canonical JobSpec, written as a pending task and sent to the queue;
nothing about generation happens here. Most well-formed submissions are
answered before Flask by api/fastsubmit.py, with the same schema and builder.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

from flask import Response, jsonify, request
from flask_smorest import Blueprint, abort

from api.auth import current_key
from api.dialects.native import schemas
from api.controlnet import controlnet_list
from api.dialects.native.translate import attach_controlnet, attach_mask, build_jobspec, created_body, render_task
from api.errors import error_response
from api.eventstream import open_stream, valid_event_id
from api.fastsubmit import TASK_ID_ENVIRON
from api.limits import read_limited, submit_limited
from api.loras import forget_lora, usable_loras
from api.uploads import owned_models
from api.services import Services, services
from api.submission import new_task_id, submit_job, wait_until_terminal
from common.errors import TaskNotFound
from common.queue import hand_over_callback
from common.schedulers import SCHEDULERS, schedule_of
from common.storage import task_metadata
from common.store import CancelOutcome, Task, TaskStatus


DIALECT = "native"
NOT_FOUND = "任务不存在"                    # the original service's exact detail
CANCEL_WAIT_SECONDS = 5.0
SECURITY = [{"ApiKeyAuth": []}]

blp = Blueprint(DIALECT, __name__, url_prefix="/api/v1",
                description="Native API: asynchronous jobs, polled or long-polled, with callbacks")


@blp.before_request
def authenticate():
    """Every native route needs a key (X-API-Key by default); 401 / 403 in the native error shape."""
    keys = services().keys
    return keys.check(DIALECT, None,
                      lambda: error_response(401, f"Invalid or missing API key (header {keys.header})",
                                             {"WWW-Authenticate": f'ApiKey header="{keys.header}"'}),
                      lambda: error_response(403, "this API key may not use the native API"))


IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 255


def owned_task_or_404(svc: Services, task_id: str) -> Task:
    try:
        return svc.store.get_owned(task_id, current_key().owner)
    except TaskNotFound:
        abort(404, message=NOT_FOUND)


@blp.route("/generate", methods=["POST"])
@submit_limited
@blp.arguments(schemas.GENERATE_REQUEST, location="json")
@blp.response(202, schemas.TaskCreatedSchema)
@blp.doc(security=SECURITY)
def generate(data: dict):
    """Queue a txt2img job; img2img when init_image is given; inpainting when mask_image comes with it."""
    svc = services()
    task_id = request.environ.get(TASK_ID_ENVIRON) or new_task_id()
    idempotency = idempotency_key()
    if idempotency:
        replay = replayed_submission(svc, idempotency, task_id)
        if replay is not None:
            return replay
    try:
        image_key = None
        if data["init_image"] is not None:
            image = data["init_image"]
            image_key = svc.storage.input_key(task_id, f"init.{image.format}")
            svc.storage.put(image_key, image.data, image.content_type, metadata=task_metadata(task_id))
        spec = build_jobspec(data, svc, current_key(), image_key)
        if data["mask_image"] is not None:
            attach_mask(svc, spec, data, task_id)
        if data["controlnet"]:
            attach_controlnet(svc, spec, data, task_id)
        submit_job(svc, current_key().owner, spec, task_id)
    except BaseException:
        if idempotency:
            svc.store.release_idempotency(current_key().owner, idempotency)   # refused: a retry may try again
        raise
    return created_response(task_id)


def created_response(task_id: str, replayed: bool = False):
    """The 202 answer (a ready Response skips flask-smorest's re-serialisation; TaskCreatedSchema documents it)."""
    response = jsonify(created_body(task_id))
    response.status_code = 202
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def idempotency_key() -> str | None:
    """The request's Idempotency-Key header (1..255 characters), or None; a 422 naming it otherwise."""
    value = request.headers.get(IDEMPOTENCY_HEADER)
    if value is None:
        return None
    if not 0 < len(value) <= MAX_IDEMPOTENCY_KEY:
        abort(422, errors={"headers": {IDEMPOTENCY_HEADER: [f"1 to {MAX_IDEMPOTENCY_KEY} characters"]}})
    return value


def replayed_submission(svc: Services, idempotency: str, task_id: str,
                        answer: Callable[..., Any] | None = None):
    """The first answer again (`answer(task_id, replayed=True)`, by default generate's 202) when this key's
    Idempotency-Key was used before (24 h); None for a new one.

    The same key with another body is a 422: the client reused a key for a
    different request, and answering with the first task would hide it.
    """
    fingerprint = hashlib.sha256(request.get_data()).hexdigest()
    first = svc.store.claim_idempotency(current_key().owner, idempotency, task_id, fingerprint)
    if first is None:
        return None
    first_task, first_fingerprint = first
    if first_fingerprint != fingerprint:
        abort(422, errors={"headers": {IDEMPOTENCY_HEADER: [
            "already used with a different body (an Idempotency-Key names one submission)"]}})
    return (answer or created_response)(first_task, replayed=True)


@blp.route("/tasks/<string:task_id>", methods=["GET"])
@read_limited
@blp.arguments(schemas.TaskQuery(), location="query")
@blp.response(200, schemas.TaskSchema)
@blp.doc(security=SECURITY)
def get_task(query: dict, task_id: str):
    """A task's status, progress, queue position and image URLs."""
    svc = services()
    task = owned_task_or_404(svc, task_id)
    if query["wait"] and not task.status.terminal:
        wait_until_terminal(svc, task_id, query["wait"])
        task = svc.store.get(task_id)
    return render_task(task, svc.storage, svc.store)


LAST_EVENT_ID = "Last-Event-ID"


@blp.route("/tasks/<string:task_id>/events", methods=["GET"])
@read_limited
@blp.arguments(schemas.EventsQuery(), location="query")
@blp.response(200, content_type="text/event-stream", description=(
    "Server-sent events until the task ends (docs/events.md): queued, started, progress, preview, then one of "
    "completed / failed / cancelled carrying the body of GET /api/v1/tasks/{id}"))
@blp.alt_response(204, description="The Last-Event-ID given is the task's final event: nothing more will come")
@blp.alt_response(503, description="Every stream slot of this API process is taken (api.max_streams); "
                                   "reconnect after Retry-After")
@blp.doc(security=SECURITY)
def task_events(query: dict, task_id: str):
    """A task's events as they happen, as server-sent events; resumable with Last-Event-ID."""
    svc = services()
    task = owned_task_or_404(svc, task_id)
    last_id = request.headers.get(LAST_EVENT_ID) or query["last_event_id"]
    if last_id is not None and not valid_event_id(last_id):
        abort(422, errors={"headers": {LAST_EVENT_ID: ["not an event id this service sent (such as 1733555000123-0)"]}})
    stream = open_stream(svc.store, svc.waits, task,
                         lambda t: schemas.TaskSchema().dump(render_task(t, svc.storage, svc.store)),
                         last_id, svc.settings.api.stream_seconds)
    if stream is None:
        return Response(status=204)
    return Response(stream, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@blp.route("/tasks/<string:task_id>", methods=["DELETE"])
@submit_limited
@blp.response(200, schemas.TaskSchema)
@blp.alt_response(202, schema=schemas.TaskSchema, description="Cancel requested; the job stops at its next step")
@blp.alt_response(409, description="The task already completed or failed")
@blp.doc(security=SECURITY)
def cancel_task(task_id: str):
    """Cancel a pending task at once, or a running one at its next denoising step."""
    svc = services()
    return cancel_answer(svc, owned_task_or_404(svc, task_id), lambda task: render_task(task, svc.storage, svc.store))


def submit_once(svc: Services, submit: Callable[[str], Any], body_of: Callable[[str], dict], schema: Any,
                problems: tuple[type, ...]) -> Any:
    """Run `submit(task_id)` for a new task under the request's Idempotency-Key and answer `body_of(task_id)`.

    A replay of the key answers the first task's body as it stands now (202, Idempotent-Replayed); a refused
    submission frees the key for its retry. `problems`: the core's refusals (with `field` and `status`),
    answered as a 422 naming the field, or their own status.
    """
    task_id, idempotency = new_task_id(), idempotency_key()
    if idempotency:
        replay = replayed_submission(svc, idempotency, task_id,
                                     lambda first, replayed: replayed_answer(schema.dump(body_of(first))))
        if replay is not None:
            return replay
    try:
        submit(task_id)
    except BaseException as exc:
        if idempotency:
            svc.store.release_idempotency(current_key().owner, idempotency)   # refused: a retry may try again
        if not isinstance(exc, problems):
            raise
        if exc.status == 422:
            abort(422, errors={"json": {exc.field: [str(exc)]}})
        return error_response(exc.status, str(exc))
    return body_of(task_id)


def replayed_answer(body: dict) -> Response:
    """The 202 of a replayed submission (the same Idempotency-Key again)."""
    response = jsonify(body)
    response.status_code = 202
    response.headers["Idempotent-Replayed"] = "true"
    return response


def cancel_answer(svc: Services, task: Task, render: Callable[[Task], dict], noun: str = "task") -> Any:
    """Cancel `task` and answer: 200 cancelled, 202 still stopping (both with `render`'s body), 409 when it had
    already completed or failed."""
    task = cancel(svc, task)
    if task.status in (TaskStatus.COMPLETED, TaskStatus.FAILED):
        return error_response(409, f"{noun} already {task.status.value}; it cannot be cancelled")
    return render(task), (200 if task.status is TaskStatus.CANCELLED else 202)


def cancel(svc: Services, task: Task) -> Task:
    """Cancel a task (a waiting one at once, a running one at its next step, waited for a few seconds); the
    task as it stands after (cancelled, still stopping, or already ended)."""
    outcome = svc.store.request_cancel(task)
    if outcome is CancelOutcome.CANCELLED and task.spec.callback_url:
        hand_over_callback(svc.celery, svc.store, task.id, svc.settings.callbacks.queue)
    if outcome is CancelOutcome.CANCELLING:
        wait_until_terminal(svc, task.id, CANCEL_WAIT_SECONDS)
    return svc.store.get(task.id)


@blp.route("/tasks", methods=["GET"])
@read_limited
@blp.arguments(schemas.TaskListQuery(), location="query")
@blp.response(200, schemas.TaskListSchema)
@blp.doc(security=SECURITY)
def list_tasks(query: dict):
    """The caller's tasks, newest first."""
    svc = services()
    status = TaskStatus(query["status"]) if query["status"] else None
    tasks, total = svc.store.list_owned(current_key().owner, query["offset"], query["limit"], status)
    return {"tasks": [render_task(t, svc.storage, svc.store) for t in tasks], "total": total,
            "limit": query["limit"], "offset": query["offset"]}


@blp.route("/models", methods=["GET"])
@read_limited
@blp.response(200, schemas.ModelListSchema)
@blp.doc(security=SECURITY)
def list_models():
    """Models in the model directory with their family and request defaults; `loaded` when a live worker holds it
    warm; `own`: this key's own checkpoints (merges' results, uploads), which `model` takes by file name."""
    svc = services()
    warm = {m for w in svc.workers.live() for m in w.models}
    default = svc.catalog.default_model()
    return {"default": default, "models": [
        {**m.to_dict(), "default": m.name == default, "loaded": m.name in warm} for m in svc.catalog.models()],
        "controlnets": controlnet_list(svc), "own": owned_models(svc, current_key().owner)}


@blp.route("/schedulers", methods=["GET"])
@read_limited
@blp.response(200, schemas.SchedulerListSchema)
@blp.doc(security=SECURITY)
def list_schedulers():
    """Scheduler names accepted by `scheduler`; `schedule` says which models each runs (beta: SD 1.x/2.x/SDXL, flow: SD3/Flux)."""
    return {"default": services().settings.defaults.scheduler or None,
            "schedulers": [{"name": n, "description": d, "schedule": schedule_of(n)} for n, d in SCHEDULERS.items()]}


@blp.route("/loras", methods=["GET"])
@read_limited
@blp.response(200, schemas.LoraListSchema)
@blp.doc(security=SECURITY)
def list_loras():
    """LoRAs usable in `loras`: the LoRA directory's, then this key's own (trained or uploaded)."""
    return {"loras": usable_loras(services(), current_key().owner)}


@blp.route("/loras/<string:name>", methods=["DELETE"])
@submit_limited
@blp.response(204)
@blp.alt_response(404, description="This key has no LoRA of that name")
@blp.alt_response(409, description="The LoRA is in the shared LoRA directory (an operator's file)")
@blp.doc(security=SECURITY)
def delete_lora(name: str):
    """Delete this key's own LoRA (trained or uploaded) of that name; jobs naming it afterwards get a 422."""
    svc = services()
    if name in svc.catalog.loras():
        return error_response(409, f"LoRA '{name}' is in the shared LoRA directory; an operator removes it there")
    if not forget_lora(svc, current_key().owner, name):
        abort(404, message="LoRA not found")
    return None
