"""The native API (seed 002): /api/v1/generate, tasks, models, schedulers, LoRAs.

Why a thin translator: the request is validated by its schema, turned into
the canonical JobSpec, written as a pending task and sent to the queue;
nothing about generation happens here.
"""
from __future__ import annotations

from flask import jsonify, request
from flask_smorest import abort
from flask_smorest import Blueprint

from api import schemas
from api.auth import ApiKey, current_key
from api.errors import error_response
from api.fastsubmit import TASK_ID_ENVIRON
from api.services import Services, services
from api.submission import new_task_id, resolve_seed, submit_job, wait_until_terminal
from api.task_view import render_task
from common.errors import TaskNotFound
from common.jobspec import JobSpec, LoraRef
from common.queue import send_callback
from common.schedulers import SCHEDULERS
from common.store import CancelOutcome, TaskStatus

CREATED_MESSAGE = "任务已创建，正在处理中"   # seed 002's exact message
NOT_FOUND = "任务不存在"                    # seed 002's exact detail
CANCEL_WAIT_SECONDS = 5.0
SECURITY = [{"ApiKeyAuth": []}]


def created_body(task_id: str) -> dict:
    """seed 002's 202 answer to a submission."""
    return {"task_id": task_id, "status": TaskStatus.PENDING.value, "message": CREATED_MESSAGE}


def build_jobspec(data: dict, svc: Services, key: ApiKey, init_image_key: str | None = None) -> JobSpec:
    """Native request (validated) -> canonical job with every default filled."""
    defaults = svc.settings.defaults
    model_name = data["model"] or svc.catalog.default_model()
    if model_name is None:
        abort(503, message="no model is available yet; add one to the model directory")
    if not key.may_use_model(model_name):
        abort(403, message=f"this API key may not use model '{model_name}'")
    if not key.may_use_priority(data["priority"]):
        abort(403, message=f"this API key may not use priority '{data['priority']}'")
    model = svc.catalog.model(model_name)
    native = model.native_size if model else 512
    image = data["init_image"]
    if image is not None:
        width, height = image.width // 8 * 8, image.height // 8 * 8
    else:
        width, height = data["width"] or native, data["height"] or native
    return JobSpec(
        prompt=data["prompt"], negative_prompt=data["negative_prompt"], model=model_name,
        width=width, height=height, num_images=data["num_images"],
        num_inference_steps=data["num_inference_steps"] or defaults.num_inference_steps,
        guidance_scale=data["guidance_scale"] if data["guidance_scale"] is not None else defaults.guidance_scale,
        strength=(data["strength"] if data["strength"] is not None else defaults.strength) if image else None,
        scheduler=data["scheduler"] or defaults.scheduler or None,
        seed=resolve_seed(data["seed"]), output_format=data["output_format"],
        init_image_key=init_image_key, loras=[LoraRef(lr["name"], lr["weight"]) for lr in data["loras"]],
        callback_url=data["callback_url"], dialect="native", priority=data["priority"],
    )


def owned_task_or_404(svc: Services, task_id: str):
    try:
        return svc.store.get_owned(task_id, current_key().owner)
    except TaskNotFound:
        abort(404, message=NOT_FOUND)


def create_native_blueprint(settings, generate_schema, limits) -> Blueprint:
    """`generate_schema`: the request schema instance, shared with api/fastsubmit.py."""
    blp = Blueprint("native", __name__, url_prefix="/api/v1",
                    description="Native API (seed 002): asynchronous jobs, polled or long-polled, with callbacks")
    # Instances, not classes: webargs would build (and deep-copy) a schema per request.
    GenerateRequest = generate_schema
    TaskQuery = schemas.task_query_schema(settings)()

    @blp.route("/generate", methods=["POST"])
    @limits.submit
    @blp.arguments(GenerateRequest, location="json")
    @blp.response(202, schemas.TaskCreatedSchema)
    @blp.doc(security=SECURITY)
    def generate(data: dict):
        """Queue a txt2img job, or img2img when init_image is given."""
        svc = services()
        task_id = request.environ.get(TASK_ID_ENVIRON) or new_task_id()
        image_key = None
        if data["init_image"] is not None:
            image = data["init_image"]
            image_key = svc.storage.input_key(task_id, f"init.{image.format}")
            svc.storage.put(image_key, image.data, image.content_type)
        spec = build_jobspec(data, svc, current_key(), image_key)
        submit_job(svc, current_key().owner, spec, task_id)
        # A ready Response skips flask-smorest's re-serialisation; TaskCreatedSchema still documents it.
        # Well-formed submissions are usually answered before Flask by api/fastsubmit.py (same builder).
        response = jsonify(created_body(task_id))
        response.status_code = 202
        return response

    @blp.route("/tasks/<string:task_id>", methods=["GET"])
    @limits.read
    @blp.arguments(TaskQuery, location="query")
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

    @blp.route("/tasks/<string:task_id>", methods=["DELETE"])
    @blp.response(200, schemas.TaskSchema)
    @blp.alt_response(202, schema=schemas.TaskSchema, description="Cancel requested; the job stops at its next step")
    @blp.alt_response(409, description="The task already completed or failed")
    @blp.doc(security=SECURITY)
    def cancel_task(task_id: str):
        """Cancel a pending task at once, or a running one at its next denoising step."""
        svc = services()
        task = owned_task_or_404(svc, task_id)
        outcome = svc.store.request_cancel(task)
        if outcome is CancelOutcome.CANCELLED and task.spec.callback_url:
            send_callback(svc.celery, task.id, svc.settings.callbacks.queue)
        if outcome is CancelOutcome.CANCELLING:
            wait_until_terminal(svc, task.id, CANCEL_WAIT_SECONDS)
        task = svc.store.get(task.id)
        if task.status in (TaskStatus.COMPLETED, TaskStatus.FAILED):
            return error_response(409, f"task already {task.status.value}; it cannot be cancelled")
        body = render_task(task, svc.storage, svc.store)
        return body, (200 if task.status is TaskStatus.CANCELLED else 202)

    @blp.route("/tasks", methods=["GET"])
    @limits.read
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
    @blp.response(200, schemas.ModelListSchema)
    @blp.doc(security=SECURITY)
    def list_models():
        """Models in the model directory; `loaded` when a live worker holds it warm."""
        svc = services()
        warm = {m for w in svc.workers.live() for m in w.models}
        default = svc.catalog.default_model()
        return {"default": default, "models": [
            {**m.to_dict(), "default": m.name == default, "loaded": m.name in warm} for m in svc.catalog.models()]}

    @blp.route("/schedulers", methods=["GET"])
    @blp.response(200, schemas.SchedulerListSchema)
    @blp.doc(security=SECURITY)
    def list_schedulers():
        """Scheduler names accepted by `scheduler`."""
        return {"default": settings.defaults.scheduler or None,
                "schedulers": [{"name": n, "description": d} for n, d in SCHEDULERS.items()]}

    @blp.route("/loras", methods=["GET"])
    @blp.response(200, schemas.LoraListSchema)
    @blp.doc(security=SECURITY)
    def list_loras():
        """LoRAs in the LoRA directory, usable in `loras`."""
        return {"loras": [{"name": n} for n in services().catalog.loras()]}

    return blp
