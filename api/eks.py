"""SD on EKS's asynchronous endpoint (seed 000): POST / (and under a stage prefix such as /prod/).

Why a translator: the body is A1111 parameters plus `alwayson_scripts`
(task, sd_model_checkpoint, id_task, uid, save_dir); it becomes the same
canonical job, whose images the worker writes under
s3://{bucket}/{save_dir}/{id_task}/, with the original's response-<uuid>.out
JSON beside them. The call answers at once. The client's id_task is an
idempotency key: the task id is derived from (key, id_task), and the atomic
create refuses a second job with the same id. image-to-image takes
init_images, or image_link URLs (http(s), SSRF-guarded, or s3:// in the
service's bucket) that the API fetches.
"""
from __future__ import annotations

import hashlib
import re
import uuid
from typing import Any

from flask import jsonify
from flask_smorest import Blueprint
from marshmallow import Schema, ValidationError, fields, validate, validates, validates_schema

from api.a1111 import build_a1111_jobspec, echo_parameters, find_checkpoint, unhonoured
from api.a1111_schemas import ImageList, a1111_request_schemas
from api.auth import current_key
from api.downloads import DownloadRefused, fetch_link
from api.errors import DIALECT_RENDERERS, detail_text, flatten_messages, json_error
from api.init_image import InitImage, InitImageError, image_from_bytes
from api.schemas import BaseSchema
from api.services import services
from api.submission import submit_job

BLUEPRINT = "eks"
TASKS = {"text-to-image": "txt2img", "image-to-image": "img2img"}
ID_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
SAVE_DIR_PATTERN = re.compile(r"^[A-Za-z0-9_.\-/]{1,256}$")


def eks_error(status: int, detail: Any, headers: dict | None = None):
    """API Gateway / Lambda errors are {"message": "..."}; validation lists the fields."""
    detail = "Too Many Requests" if status == 429 else detail_text(detail)
    return json_error(400 if status == 422 else status, {"message": detail}, headers)


DIALECT_RENDERERS[BLUEPRINT] = eks_error


class AlwaysOnScripts(BaseSchema):
    task = fields.String(required=True, validate=validate.OneOf(list(TASKS)))
    sd_model_checkpoint = fields.String(required=True)
    id_task = fields.Raw(required=True, metadata={"description": "Client-chosen job id; resubmitting it creates no second job"})
    uid = fields.Raw(load_default=None)
    save_dir = fields.String(load_default="outputs")
    image_link = fields.String(load_default=None, allow_none=True)

    @validates("id_task")
    def plain_id(self, value: Any, **_: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not ID_PATTERN.match(str(value)):
            raise ValidationError("id_task must be letters, digits, '-', '_' or '.' (at most 128)")

    @validates("save_dir")
    def plain_dir(self, value: str, **_: Any) -> None:
        if not SAVE_DIR_PATTERN.match(value) or ".." in value.split("/") or value.startswith("/"):
            raise ValidationError("save_dir must be a relative path of letters, digits, '-', '_', '.', '/'")

    @validates("image_link")
    def plain_links(self, value: str | None, **_: Any) -> None:
        if len(links_of(value)) > 16:
            raise ValidationError("at most 16 links")
        for link in links_of(value):
            if not link.startswith(("http://", "https://", "s3://")):
                raise ValidationError(f"{link[:80]!r}: image_link is a comma-separated list of http(s):// or s3:// URLs")


def links_of(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def eks_schemas(settings) -> tuple[Schema, Schema]:
    """(txt2img, img2img) request schemas: A1111's, with the alwayson_scripts envelope required."""
    txt2img, img2img = a1111_request_schemas(settings)

    class EksTxt2Img(txt2img):
        alwayson_scripts = fields.Nested(AlwaysOnScripts, required=True)

    class EksImg2Img(img2img):
        alwayson_scripts = fields.Nested(AlwaysOnScripts, required=True)
        init_images = ImageList(load_default=list, metadata={
            "description": "Base64 images; or give alwayson_scripts.image_link (URLs fetched by sdqueue)"})

        @validates_schema
        def some_image(self, data: dict, **_: Any) -> None:
            if not data.get("init_images") and not links_of((data.get("alwayson_scripts") or {}).get("image_link")):
                raise ValidationError("image-to-image needs init_images or alwayson_scripts.image_link",
                                      field_name="init_images")

    return EksTxt2Img(), EksImg2Img()


def fetch_images(svc, image_link: str, warnings: list[str]) -> list[InitImage]:
    """The init image: the first of the comma-separated image_link URLs, fetched and checked."""
    links = links_of(image_link)
    if len(links) > 1:
        warnings.append(f"image_link: only the first of {len(links)} links is used")

    def may_read(metadata: dict[str, str]) -> bool:
        task_id = metadata.get("task-id")
        return not task_id or svc.store.owner_of(task_id) == current_key().owner

    return [image_from_bytes(fetch_link(links[0], svc.settings, svc.storage, may_read))]


def eks_task_id(owner: str, id_task: str) -> str:
    return "eks-" + hashlib.sha256(f"{owner}\0{id_task}".encode()).hexdigest()[:32]


def create_eks_blueprint(settings, limits, keys) -> Blueprint:
    blp = Blueprint(BLUEPRINT, __name__, description="SD on EKS (seed 000): asynchronous jobs, images in S3")
    blp.before_request(keys.authenticator(BLUEPRINT, None, lambda: eks_error(401, "Unauthorized"),
                                          lambda: eks_error(403, "Forbidden")))
    txt2img, img2img = eks_schemas(settings)

    def submit():
        from flask import request

        raw = request.get_json(silent=True)
        if not isinstance(raw, dict):
            return eks_error(400, "Incorrect payload structure: a JSON object is required")
        scripts = raw.get("alwayson_scripts")
        task = scripts.get("task") if isinstance(scripts, dict) else None
        schema = img2img if task == "image-to-image" else txt2img
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
        id_task = str(scripts["id_task"])
        location = f"{scripts['save_dir'].strip('/')}/{id_task}"
        task_id = eks_task_id(current_key().owner, id_task)
        if not svc.store.exists(task_id):   # a resubmission fetches and uploads nothing either
            mode = TASKS[scripts["task"]]
            fetched: list[str] = []
            if mode == "img2img" and scripts["image_link"]:
                try:
                    data["init_images"] = fetch_images(svc, scripts["image_link"], fetched)
                except (DownloadRefused, InitImageError) as exc:
                    return eks_error(400, f"image_link: {exc}")
            data["alwayson_scripts"] = {}
            warnings = unhonoured(data, mode) + fetched
            spec = build_a1111_jobspec(svc, data, mode, task_id, warnings, model=model, dialect=BLUEPRINT)
            spec.output_prefix = location
            spec.sidecar_key = f"{location}/response-{uuid.uuid4()}.out"
            spec.meta = {"id_task": id_task, "uid": scripts["uid"], "warnings": warnings, "sidecar_style": "eks-response",
                         "sidecar": {"id_task": id_task, "parameters": echo_parameters(data)}}
            submit_job(svc, current_key().owner, spec, task_id)
        return jsonify({"id_task": id_task, "task": scripts["task"], "sd_model_checkpoint": scripts["sd_model_checkpoint"],
                        "output_location": f"s3://{svc.storage.bucket}/{location}"})

    blp.add_url_rule("/", endpoint="submit", view_func=limits.submit(submit), methods=["POST"])
    return blp
