"""The /v1/draw API (SDAI's draw): Bearer-authenticated, synchronous, answers image URLs.

Why a translator: prompt, aspect ratio and quantity become the canonical job;
the call waits on the event hub and answers the original's
{"urls", "object": "draw", "prompt", "model", "created", "end_at"}.
Errors carry the original's codes (its table is Anthropic's, so is the body:
{"type": "error", "error": {"type", "message"}}); 529 when the queue is over
tasks.max_pending.
"""
from __future__ import annotations

import time
from typing import Any

from flask import jsonify
from flask_smorest import Blueprint

from api.auth import bearer_token, current_key
from api.dialects.draw.schemas import DRAW_REQUEST
from api.dialects.draw.translate import DIALECT, build_draw_jobspec
from api.errors import DIALECT_RENDERERS, detail_text, json_error
from api.limits import submit_limited
from api.modelfit import default_scheduler, fit_errors
from api.services import services
from api.submission import new_task_id, submit_job, wait_for_result
from api.waiter import WaitersFull
from common.errors import QueueFull
from common.store import TaskStatus


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "invalid_request_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
               504: "api_error", 529: "overloaded_error"}


def draw_error(status: int, detail: Any, headers: dict | None = None):
    """The original's codes: validation is 400 (it lists no 422); a busy service is 529."""
    status = {422: 400, 503: 529}.get(status, status)
    body = {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": detail_text(detail)}}
    return json_error(status, body, headers)


DIALECT_RENDERERS[DIALECT] = draw_error


blp = Blueprint(DIALECT, __name__, url_prefix="/v1", description="The /v1/draw API: synchronous, image URLs")


@blp.before_request
def authenticate():
    """`Authorization: Bearer <key>` (or the key header)."""
    return services().keys.check(DIALECT, bearer_token,
                                 lambda: draw_error(401, "invalid or missing API key (Authorization: Bearer)"),
                                 lambda: draw_error(403, "this API key may not use /v1/draw"))


@blp.route("/draw", methods=["POST"])
@submit_limited
@blp.arguments(DRAW_REQUEST, location="json")
@blp.doc(security=[{"BearerAuth": []}])
def draw(data: dict):
    """Draw `quantity` images for `prompt` at the aspect ratio `size`; waits and answers their URLs."""
    svc = services()
    model_name = data["model"] or svc.catalog.default_model()
    if model_name is None:
        return draw_error(529, "no model is available yet")
    if not current_key().may_use_model(model_name):
        return draw_error(403, f"this API key may not use model '{model_name}'")
    model = svc.catalog.model(model_name)
    if model is None:
        return draw_error(529, f"model '{model_name}' is not in the model directory")
    problems = fit_errors(model, mode="txt2img", width=model.request_defaults.width,
                          height=model.request_defaults.height)
    if problems:
        return draw_error(400, "; ".join(f"{k}: {' '.join(v)}" for k, v in problems.items()))
    spec = build_draw_jobspec(data, model, default_scheduler(svc.settings, model))
    created = int(time.time())
    try:
        task_id = submit_job(svc, current_key().owner, spec, new_task_id())
        task = wait_for_result(svc, task_id)
    except (QueueFull, WaitersFull) as exc:
        return draw_error(529, str(exc) or "the service is overloaded; retry later", {"Retry-After": "5"})
    if task.status is TaskStatus.CANCELLED:   # its own key cancelled it (DELETE /api/v1/tasks/{id}): no server error
        return draw_error(409, f"the job was cancelled before it finished ({task.error or 'cancelled'})")
    if task.status is not TaskStatus.COMPLETED:
        return draw_error(500, task.error or f"the job ended {task.status.value}")
    return jsonify({"urls": [svc.storage.url_for(k) for k in task.result_keys], "object": "draw",
                    "prompt": data["prompt"], "model": model_name, "created": created,
                    "end_at": int(task.finished_at or time.time())})
