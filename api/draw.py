"""SDAI's /v1/draw (seed 003): Bearer-authenticated, synchronous, answers image URLs.

Why a translator: prompt, aspect ratio and quantity become the canonical job;
the call waits on the event hub and answers seed 003's
{"urls", "object": "draw", "prompt", "model", "created", "end_at"}.
Errors carry seed 003's codes (its table is Anthropic's, so is the body:
{"type": "error", "error": {"type", "message"}}); 529 when the queue is over
tasks.max_pending.
"""
from __future__ import annotations

import math
import time
from typing import Any

from flask import jsonify
from flask_smorest import Blueprint
from marshmallow import ValidationError, fields, validate, validates

from api.auth import bearer_token, current_key
from api.errors import DIALECT_RENDERERS, detail_text, json_error
from api.schemas import BaseSchema, LooseInteger
from api.services import services
from api.submission import new_task_id, resolve_seed, submit_job, wait_for_result
from common.errors import QueueFull
from common.jobspec import JobSpec
from api.waiter import WaitersFull
from common.store.tasks import TaskStatus

BLUEPRINT = "draw"
RATIOS = {"16:9": (16, 9), "1:1": (1, 1), "9:16": (9, 16), "3:4": (3, 4), "4:3": (4, 3)}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 503: "overloaded_error", 504: "api_error",
               529: "overloaded_error"}


def draw_error(status: int, detail: Any, headers: dict | None = None):
    """Seed 003's codes: validation is 400 (it lists no 422); a busy service is 529."""
    status = {422: 400, 503: 529}.get(status, status)
    body = {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": detail_text(detail)}}
    return json_error(status, body, headers)


DIALECT_RENDERERS[BLUEPRINT] = draw_error


def size_for(ratio: str, native: int) -> tuple[int, int]:
    """An aspect ratio at about the model's native pixel count, both sides multiples of 8."""
    a, b = RATIOS[ratio]
    width = native * math.sqrt(a / b)
    height = native * math.sqrt(b / a)
    return max(8, round(width / 8) * 8), max(8, round(height / 8) * 8)


def draw_schema(settings, catalog):
    class DrawRequest(BaseSchema):
        prompt = fields.String(required=True, validate=validate.Length(min=1, max=settings.limits.max_prompt_chars),
                               metadata={"example": "cat"})
        size = fields.String(load_default="1:1", validate=validate.OneOf(list(RATIOS)),
                             metadata={"description": "Aspect ratio: " + ", ".join(RATIOS)})
        quantity = LooseInteger(load_default=1, validate=validate.Range(1, settings.limits.max_images))
        model = fields.String(load_default=None, allow_none=True, metadata={"description": "Model name; default: the service's"})

        @validates("model")
        def known(self, value: str | None, **_: Any) -> None:
            if value is not None and catalog.model(value) is None:
                raise ValidationError(f"unknown model '{value}'")

    return DrawRequest()


def create_draw_blueprint(settings, catalog, limits, keys) -> Blueprint:
    blp = Blueprint(BLUEPRINT, __name__, url_prefix="/v1", description="SDAI draw (seed 003): synchronous, image URLs")
    blp.before_request(keys.authenticator(BLUEPRINT, bearer_token,
                                          lambda: draw_error(401, "invalid or missing API key (Authorization: Bearer)"),
                                          lambda: draw_error(403, "this API key may not use /v1/draw")))
    schema = draw_schema(settings, catalog)

    @blp.route("/draw", methods=["POST"])
    @limits.submit
    @blp.arguments(schema, location="json")
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
        width, height = size_for(data["size"], model.native_size if model else 512)
        defaults = settings.defaults
        spec = JobSpec(prompt=data["prompt"], model=model_name, width=width, height=height,
                       num_images=data["quantity"], num_inference_steps=defaults.num_inference_steps,
                       guidance_scale=defaults.guidance_scale, seed=resolve_seed(None),
                       scheduler=defaults.scheduler or None, dialect=BLUEPRINT)
        created = int(time.time())
        try:
            task_id = submit_job(svc, current_key().owner, spec, new_task_id())
            task = wait_for_result(svc, task_id)
        except (QueueFull, WaitersFull) as exc:
            return draw_error(529, str(exc) or "the service is overloaded; retry later", {"Retry-After": "5"})
        if task.status is not TaskStatus.COMPLETED:
            return draw_error(500, task.error or f"the job ended {task.status.value}")
        return jsonify({"urls": [svc.storage.url_for(k) for k in task.result_keys], "object": "draw",
                        "prompt": data["prompt"], "model": model_name, "created": created,
                        "end_at": int(task.finished_at or time.time())})

    return blp
