"""The AUTOMATIC1111 web UI API (`/sdapi/v1`): synchronous for the client, queued underneath.

Why a translator: txt2img/img2img requests become the canonical JobSpec and
go through the same queue, workers and S3 as every other dialect (so they
scale with workers); the call then waits on the event hub and answers in
A1111's shape: base64 images, the request echoed as `parameters`, and
`info` as A1111's Processed.js() JSON string.
"""
from __future__ import annotations

import base64
import json
from typing import Any

from flask import jsonify, request
from flask_smorest import Blueprint

from api.auth import basic_auth_password, current_key
from api.dialects.a1111 import schemas
from api.dialects.a1111.extras import ExtrasFailed, answer_batch, answer_single
from api.dialects.a1111.translate import (DIALECT, build_a1111_jobspec, build_info, chosen_model, default_options,
                                          echo_parameters, find_checkpoint, model_stem, model_title, png_info,
                                          progress_of, screen_fields, stored_options)
from api.errors import DIALECT_RENDERERS, error_response, json_error
from api.loras import owned_loras
from api.limits import read_limited, submit_limited
from api.services import Services, services
from api.submission import new_task_id, submit_job, wait_for_result
from api.controlnet import controlnet_list
from common.catalog import model_sha256
from common.controlnets import CANNY_HIGH, CANNY_LOW, MAX_UNITS, PREPROCESSORS, PROCESSOR_RES
from common.embeddings import report_for
from common.samplers import SAMPLERS, SCHEDULE_TYPES
from common.upscalers import LATENT_MODES, LISTED_SCALE, PIXEL_UPSCALERS, list_model_upscalers
from common.store import Task, TaskStatus


SECURITY = [{"ApiKeyAuth": []}, {"BasicAuth": []}]
SCHEDULE_NAMES = {"Automatic": "automatic", "Uniform": "uniform", "Karras": "karras", "Exponential": "exponential",
                  "SGM Uniform": "sgm_uniform", "Beta": "beta"}

blp = Blueprint(DIALECT, __name__, url_prefix="/sdapi/v1",
                description="AUTOMATIC1111 web UI API: synchronous calls, queued and run by the workers")
CONTROLNET_BLUEPRINT = "a1111-controlnet"
# sd-webui-controlnet's own routes (its scripts/api.py), under the same keys and error shape as /sdapi/v1.
controlnet_blp = Blueprint(CONTROLNET_BLUEPRINT, __name__, url_prefix="/controlnet",
                           description="The sd-webui-controlnet extension's API: its models and preprocessors")
CONTROLNET_API_VERSION = 2   # what the extension's GET /controlnet/version answers


# --- errors and auth, in A1111's shapes -------------------------------------------
def a1111_error(status: int, detail: Any, headers: dict | None = None):
    """FastAPI's {"detail": [...]} for validation, A1111's handle_exception shape for the rest."""
    if status == 422 and isinstance(detail, list):
        return error_response(422, detail, headers)
    return json_error(status, {"error": "HTTPException", "detail": detail, "body": "", "errors": ""}, headers)


def unauthorized():
    text = "Incorrect username or password" if request.headers.get("Authorization") else "Not authenticated"
    return a1111_error(401, text, {"WWW-Authenticate": "Basic"})


def forbidden():
    return a1111_error(403, "this API key may not use the A1111 API")


DIALECT_RENDERERS[DIALECT] = a1111_error
DIALECT_RENDERERS[CONTROLNET_BLUEPRINT] = a1111_error


@controlnet_blp.before_request
@blp.before_request
def authenticate():
    """The key header, or HTTP Basic with the key as password (A1111's --api-auth)."""
    return services().keys.check(DIALECT, basic_auth_password, unauthorized, forbidden)


def run_generation(data: dict, mode: str):
    """Submit, wait on the event hub, answer in A1111's shape."""
    svc = services()
    owner = current_key().owner
    warnings = screen_fields(svc, data, mode)
    task_id = new_task_id()
    spec = build_a1111_jobspec(svc, data, mode, task_id, warnings)
    submit_job(svc, owner, spec, task_id)
    svc.a1111.set_current_job(owner, task_id)
    task = wait_for_result(svc, task_id)
    if task.status is TaskStatus.FAILED:
        return json_error(500, {"error": "RuntimeError", "detail": task.error or "generation failed", "body": "",
                                "errors": task.error or "", "task_id": task.id})
    images = []
    if data["send_images"] and task.status is TaskStatus.COMPLETED:
        images = [base64.b64encode(svc.storage.get(key)).decode() for key in task.result_keys]
    info = build_info(svc, spec, task, data, warnings)
    return jsonify({"images": images, "parameters": echo_parameters(data), "info": json.dumps(info)})


def current_task(svc: Services) -> Task | None:
    task_id = svc.a1111.current_job(current_key().owner)
    if not task_id:
        return None
    try:
        return svc.store.get_owned(task_id, current_key().owner)
    except Exception:   # noqa: BLE001 - expired or foreign: no current job
        return None


def cancel_current(svc: Services) -> None:
    task = current_task(svc)
    if task is not None and not task.status.terminal:
        svc.store.request_cancel(task)


# --- routes ------------------------------------------------------------------------
@blp.route("/txt2img", methods=["POST"])
@submit_limited
@blp.arguments(schemas.TXT2IMG_REQUEST, location="json")
@blp.response(200, schemas.A1111Response)
@blp.doc(security=SECURITY)
def txt2img(data: dict):
    """Generate images from a prompt; waits for the job and returns base64 PNGs."""
    return run_generation(data, "txt2img")


@blp.route("/img2img", methods=["POST"])
@submit_limited
@blp.arguments(schemas.IMG2IMG_REQUEST, location="json")
@blp.response(200, schemas.A1111Response)
@blp.doc(security=SECURITY)
def img2img(data: dict):
    """Generate from init_images[0] (inpainting with `mask`); waits for the job."""
    return run_generation(data, "img2img")


@blp.route("/options", methods=["GET"])
@read_limited
@blp.doc(security=SECURITY)
def get_options():
    """A1111's options; sd_model_checkpoint is this key's default model."""
    svc = services()
    return jsonify({**default_options(svc), **stored_options(svc, current_key().owner)})


@blp.route("/options", methods=["POST"])
@submit_limited
@blp.arguments(schemas.OptionsUpdate(), location="json")
@blp.doc(security=SECURITY)
def set_options(data: dict):
    """Set options for this key; sd_model_checkpoint becomes its default model. Answers null."""
    svc = services()
    checkpoint = data.get("sd_model_checkpoint")
    if checkpoint is not None:
        model = find_checkpoint(svc, str(checkpoint))
        if model is None:
            return a1111_error(422, f"model {checkpoint!r} not found; see GET /sdapi/v1/sd-models")
        data["sd_model_checkpoint"] = model_title(model)
    if data:
        svc.a1111.save_options(current_key().owner, data)
    return jsonify(None)


@blp.route("/sd-models", methods=["GET"])
@read_limited
@blp.doc(security=SECURITY)
def sd_models():
    """Models in the model directory, titled `name [shorthash]` as A1111 does, with sdqueue's `family`."""
    svc = services()
    out = []
    for model in svc.catalog.models():
        sha = model_sha256(model)
        out.append({"title": model_title(model), "model_name": model_stem(model), "hash": sha[:10],
                    "sha256": sha, "filename": str(model.path.resolve()), "config": None, "family": model.family})
    return jsonify(out)


@blp.route("/samplers", methods=["GET"])
@read_limited
@blp.doc(security=SECURITY)
def samplers():
    return jsonify([{"name": s.name, "aliases": list(s.aliases), "options": {"scheduler": s.scheduler}}
                    for s in SAMPLERS])


@blp.route("/schedulers", methods=["GET"])
@read_limited
@blp.doc(security=SECURITY)
def schedulers():
    return jsonify([{"name": SCHEDULE_NAMES[label], "label": label, "aliases": None,
                     "default_rho": 7.0 if label == "Karras" else -1.0, "need_inner_model": False}
                    for label in SCHEDULE_TYPES])


@blp.route("/loras", methods=["GET"])
@read_limited
@blp.doc(security=SECURITY)
def loras():
    """The LoRA directory's, then this key's own (trained or uploaded: their S3 location as the path)."""
    svc = services()
    local = svc.catalog.loras()
    mine = [{"name": name, "alias": name, "path": svc.storage.s3_uri(lora.asset["key"]),
             "metadata": {k: v for k, v in lora.checkpoint.params.items() if isinstance(v, str)}}
            for name, lora in owned_loras(svc, current_key().owner).items() if name not in local]
    return jsonify([*({"name": name, "alias": name, "path": str(path.resolve()), "metadata": {}}
                      for name, path in local.items()), *mine])


@blp.route("/sd-vae", methods=["GET"])
@read_limited
@blp.doc(security=SECURITY)
def sd_vae():
    """Every model's own VAE is used; there are no separate VAE files."""
    return jsonify([])


@blp.route("/upscalers", methods=["GET"])
@read_limited
@blp.doc(security=SECURITY)
def upscalers():
    """The pixel upscalers, then the ESRGAN-class files of models.upscalers_dir (all of them: hr_upscaler and
    extras' upscaler_1/2), as the web UI's UpscalerItem."""
    models = list_model_upscalers(services().settings.upscalers_dir)
    return jsonify([{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": LISTED_SCALE}
                    for name in PIXEL_UPSCALERS] + [model.to_item() for model in models.values()])


@blp.route("/latent-upscale-modes", methods=["GET"])
@read_limited
@blp.doc(security=SECURITY)
def latent_upscale_modes():
    """The hires fix's latent upscalers (hr_upscaler)."""
    return jsonify([{"name": name} for name in LATENT_MODES])


def extras_response(answer, data: dict):
    """The extras' answer; a failed queued job (a model upscaler) is a 500 in A1111's shape, as txt2img's is."""
    try:
        return jsonify(answer(services(), data))
    except ExtrasFailed as exc:
        return json_error(500, {"error": "RuntimeError", "detail": str(exc), "body": "", "errors": str(exc)})


@blp.route("/extra-single-image", methods=["POST"])
@submit_limited
@blp.arguments(schemas.EXTRAS_SINGLE_REQUEST, location="json")
@blp.doc(security=SECURITY)
def extra_single_image(data: dict):
    """Upscale one image with the upscalers of GET /upscalers; answers a base64 PNG and html_info."""
    return extras_response(answer_single, data)


@blp.route("/extra-batch-images", methods=["POST"])
@submit_limited
@blp.arguments(schemas.EXTRAS_BATCH_REQUEST, location="json")
@blp.doc(security=SECURITY)
def extra_batch_images(data: dict):
    """Upscale each image of imageList; answers base64 PNGs and html_info."""
    return extras_response(answer_batch, data)


@blp.route("/embeddings", methods=["GET"])
@read_limited
@blp.doc(security=SECURITY)
def embeddings():
    """The embeddings folder's textual inversion embeddings: those that fit this key's current model are
    `loaded`, the others `skipped` (A1111's EmbeddingsResponse); unreadable files are in neither."""
    svc = services()
    model = chosen_model(svc, current_key().owner, None, [])
    return jsonify(report_for(svc.settings.embeddings_dir, model.family, model.context_width).to_dict())


@blp.route("/refresh-embeddings", methods=["POST"])
@submit_limited
@blp.doc(security=SECURITY)
def refresh_embeddings():
    """Null, as A1111: the folder is read on every listing, and workers check it before every job."""
    return jsonify(None)


@blp.route("/memory", methods=["GET"])
@read_limited
@blp.doc(security=SECURITY)
def memory():
    """RAM of this API host; GPU memory lives on the workers (see GET /health)."""
    return jsonify({"ram": ram_figures(), "cuda": {"error": "GPU memory is held by the workers; see GET /health"}})


@blp.route("/cmd-flags", methods=["GET"])
@read_limited
@blp.doc(security=SECURITY)
def cmd_flags():
    settings = services().settings
    return jsonify({"api": True, "api_auth": None, "nowebui": True, "listen": False, "port": settings.api.port,
                    "ckpt_dir": str(settings.models_dir), "lora_dir": str(settings.lora_dir),
                    "data_dir": str(settings.data_dir), "skip_torch_cuda_test": True, "no_half": False,
                    "medvram": False, "lowvram": False, "xformers": False, "api_log": False})


@blp.route("/progress", methods=["GET"])
@read_limited
@blp.arguments(schemas.ProgressQuery(), location="query")
@blp.doc(security=SECURITY)
def progress(query: dict):
    """Progress of the caller's current (latest) A1111 job."""
    svc = services()
    return jsonify(progress_of(svc, current_task(svc), query["skip_current_image"]))


@blp.route("/interrupt", methods=["POST"])
@submit_limited
@blp.doc(security=SECURITY)
def interrupt():
    """Stop the caller's current job at its next step; its call answers with no images."""
    cancel_current(services())
    return jsonify({})


@blp.route("/skip", methods=["POST"])
@submit_limited
@blp.doc(security=SECURITY)
def skip():
    """As interrupt: a job's batches run as one unit in sdqueue."""
    cancel_current(services())
    return jsonify(None)


@blp.route("/refresh-checkpoints", methods=["POST"])
@submit_limited
@blp.doc(security=SECURITY)
def refresh_checkpoints():
    services().catalog.refresh_now()
    return jsonify(None)


@blp.route("/png-info", methods=["POST"])
@submit_limited
@blp.arguments(schemas.PngInfoRequest(), location="json")
@blp.doc(security=SECURITY)
def png_info_route(data: dict):
    """Generation parameters embedded in a PNG."""
    return jsonify(png_info(data["image"]))


def ram_figures() -> dict:
    """free/used/total bytes of this host from /proc/meminfo (no psutil needed)."""
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
        total = int(info["MemTotal"].split()[0]) * 1024
        free = int(info["MemAvailable"].split()[0]) * 1024
        return {"free": float(free), "used": total - free, "total": float(total)}
    except (OSError, KeyError, ValueError):
        return {"free": 0.0, "used": 0, "total": 0.0}


# --- sd-webui-controlnet's routes ----------------------------------------------------------
@controlnet_blp.route("/version", methods=["GET"])
@read_limited
@controlnet_blp.doc(security=SECURITY)
def controlnet_version():
    """The extension's API version."""
    return jsonify({"version": CONTROLNET_API_VERSION})


@controlnet_blp.route("/model_list", methods=["GET"])
@read_limited
@controlnet_blp.doc(security=SECURITY)
def controlnet_model_list():
    """ControlNet models in models/controlnet as the extension lists them ("name [hash]"); `update` is accepted."""
    return jsonify({"model_list": [c["title"] for c in controlnet_list(services())]})


@controlnet_blp.route("/module_list", methods=["GET"])
@read_limited
@controlnet_blp.doc(security=SECURITY)
def controlnet_module_list():
    """The preprocessors sdqueue runs (none, canny), with the extension's slider details for canny."""
    return jsonify({"module_list": list(PREPROCESSORS), "module_detail": {
        "none": {"model_free": False, "sliders": []},
        "canny": {"model_free": False, "sliders": [
            {"name": "Preprocessor Resolution", "value": PROCESSOR_RES, "min": 64, "max": 2048},
            {"name": "Canny Low Threshold", "value": CANNY_LOW, "min": 1, "max": 255},
            {"name": "Canny High Threshold", "value": CANNY_HIGH, "min": 1, "max": 255}]}}})


@controlnet_blp.route("/settings", methods=["GET"])
@read_limited
@controlnet_blp.doc(security=SECURITY)
def controlnet_settings():
    """How many units a request may carry (the extension's control_net_unit_count)."""
    return jsonify({"control_net_unit_count": MAX_UNITS})
