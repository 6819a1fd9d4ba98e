"""SD on EKS's asynchronous endpoint: POST / (and under a stage prefix such as /prod/).

Why a translator: the body is A1111 parameters plus `alwayson_scripts`
(task, sd_model_checkpoint, id_task, uid, save_dir); it becomes the same
canonical job, whose images the worker writes under
s3://{bucket}/{save_dir}/{owner}/{id_task}/ (owner: the key's owner id), with
the original's response-<uuid>.out JSON beside them. The call answers at
once. The client's id_task is an idempotency key per key: the task id is
derived from (key, id_task), and the atomic create refuses a second job with
the same id; another key's same id_task is a job of its own, in its own
folder. image-to-image takes init_images, or image_link URLs (http(s),
SSRF-guarded, or s3:// in the service's bucket: the caller's own objects
only) that the API fetches.
"""
from __future__ import annotations

from typing import Any

from flask import jsonify, request
from flask_smorest import Blueprint
from marshmallow import ValidationError

from api.auth import current_key
from api.dialects.a1111 import find_checkpoint
from api.dialects.eks import schemas
from api.dialects.eks.translate import (DIALECT, build_eks_jobspec, earlier_location, eks_task_id, fetch_images,
                                       output_location, screen_eks)
from api.downloads import DownloadRefused
from api.errors import DIALECT_RENDERERS, detail_text, flatten_messages, json_error
from api.init_image import InitImageError
from api.limits import submit_limited
from api.schemas import json_body
from api.services import services
from api.submission import submit_job

blp = Blueprint(DIALECT, __name__, description="SD on EKS: asynchronous jobs, images in S3")


def eks_error(status: int, detail: Any, headers: dict | None = None):
    """API Gateway / Lambda errors are {"message": "..."}; validation lists the fields."""
    detail = "Too Many Requests" if status == 429 else detail_text(detail)
    return json_error(400 if status == 422 else status, {"message": detail}, headers)


DIALECT_RENDERERS[DIALECT] = eks_error


@blp.before_request
def authenticate():
    """The key header (the original sits behind an API Gateway key)."""
    return services().keys.check(DIALECT, None, lambda: eks_error(401, "Unauthorized"),
                                 lambda: eks_error(403, "Forbidden"))


@submit_limited
@blp.doc(security=[{"ApiKeyAuth": []}], requestBody=json_body(
    "alwayson_scripts.task picks the request: image-to-image takes init_images or alwayson_scripts.image_link",
    schemas.TXT2IMG_REQUEST, schemas.IMG2IMG_REQUEST))
def submit():
    """Queue a text-to-image or image-to-image job; answers where its images will be."""
    raw = request.get_json(silent=True)
    if not isinstance(raw, dict):
        return eks_error(400, "Incorrect payload structure: a JSON object is required")
    scripts = raw.get("alwayson_scripts")
    task = scripts.get("task") if isinstance(scripts, dict) else None
    schema = schemas.IMG2IMG_REQUEST if task == "image-to-image" else schemas.TXT2IMG_REQUEST
    try:
        data = schema.load(raw)
    except ValidationError as exc:
        return eks_error(400, flatten_messages(exc.messages, ["body"]))
    scripts = data["alwayson_scripts"]
    svc = services()
    model = find_checkpoint(svc, scripts["sd_model_checkpoint"])
    if model is None:
        return eks_error(400, f"sd_model_checkpoint {scripts['sd_model_checkpoint']!r} not found")
    if not current_key().may_use_model(model.name):
        return eks_error(403, f"this API key may not use model {model.name!r}")
    owner = current_key().owner
    task_id = eks_task_id(owner, str(scripts["id_task"]))
    earlier = earlier_location(svc, task_id, owner)
    location = earlier or output_location(scripts, owner)
    answer = {"id_task": str(scripts["id_task"]), "task": scripts["task"],
              "sd_model_checkpoint": scripts["sd_model_checkpoint"],
              "output_location": svc.storage.s3_uri(location)}
    if earlier is None:   # a resubmission fetches and uploads nothing either
        warnings = screen_eks(svc, data)
        if schemas.TASKS[scripts["task"]] == "img2img" and scripts["image_link"]:
            try:
                data["init_images"] = fetch_images(svc, scripts["image_link"])
            except (DownloadRefused, InitImageError) as exc:
                return eks_error(400, f"image_link: {exc}")
        submit_job(svc, owner, build_eks_jobspec(svc, data, model, task_id, warnings, location), task_id)
    return jsonify(answer)


blp.add_url_rule("/", endpoint="submit", view_func=submit, methods=["POST"])
