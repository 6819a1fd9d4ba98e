"""The web UI's extras tab (`/extra-single-image`, `/extra-batch-images`): upscaling an image, nothing else.

Why two paths: the resamplers (common/upscalers.py) need no model and no
GPU, and a bounded image (limits.max_size) resizes in milliseconds on the API
host, so a round trip through the queue would only add latency. The
ESRGAN-class models of GET /upscalers need torch, which the API host does not
have: a request naming one (upscaler_1, or upscaler_2 blended in) becomes a
queued job (JobSpec.extras, its images stored under the task's input prefix,
owner-scoped as init images are) that a worker runs (worker/extras.py); the
call waits for it as txt2img does (same waiter, api.sync_timeout, 503) and
answers from the job's outputs. The sizes, crop, blend and infotext are
common/extras.py on both paths. Face restoration (GFPGAN, CodeFormer) is not
run: a visibility above 0 is a 422 naming the field, as the A1111 field table
refuses what it would not run (or, for a lenient key, named in html_info).
Every check runs before anything is queued.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any

from flask_smorest import abort
from PIL import Image

from api.auth import current_key
from api.dialects.a1111.fields import Refusal, nested_errors
from api.init_image import InitImage
from api.services import Services
from api.submission import new_task_id, submit_job, wait_for_result
from common.extras import FIELDS, extras_info, infotext_line, output_size, pixel_resizer, run_extras, \
    wanted_upscalers
from common.jobspec import JobSpec
from common.storage import task_metadata
from common.store import TaskStatus
from common.upscalers import NO_UPSCALE, PIXEL_UPSCALERS, list_model_upscalers

FACE_RESTORERS = {"gfpgan_visibility": "GFPGAN face restoration is not run by sdqueue",
                  "codeformer_visibility": "CodeFormer face restoration is not run by sdqueue"}


class ExtrasFailed(Exception):
    """The queued extras job failed (the worker's message)."""


def screen_extras(svc: Services, data: dict) -> list[str]:
    """Face restorers that are on: a 422 naming each, or warnings for a lenient key."""
    found = [Refusal((name,), note) for name, note in FACE_RESTORERS.items() if data.get(name)]
    if found and not current_key().is_lenient(svc.settings.api.lenient):
        abort(422, errors={"json": nested_errors(found)})
    return [refusal.warning for refusal in found]


def check_upscalers(svc: Services, data: dict) -> bool:
    """upscaler_1 and (when it is blended in) upscaler_2 must be in GET /upscalers (a 422 naming the field);
    True when one is a model upscaler (the request then runs on a worker)."""
    models = list_model_upscalers(svc.settings.upscalers_dir)
    wanted = [("upscaler_1", data["upscaler_1"])]
    if data["extras_upscaler_2_visibility"] > 0:
        wanted.append(("upscaler_2", data["upscaler_2"]))
    errors = {field: [f"upscaler {name!r} not found; see GET /sdapi/v1/upscalers"]
              for field, name in wanted if name not in PIXEL_UPSCALERS and name not in models}
    if errors:
        abort(422, errors={"json": errors})
    return any(name not in PIXEL_UPSCALERS for _, name in wanted_upscalers(data))


def check_size(svc: Services, init: InitImage, data: dict) -> None:
    """Each side of the result within limits.max_size (a 422 naming the size field that asked for more)."""
    if data["upscaler_1"] == NO_UPSCALE:
        return
    width, height = output_size(init.width, init.height, data)
    most = svc.settings.limits.max_size
    if max(width, height) > most:
        named = "upscaling_resize_w" if data["resize_mode"] == 1 else "upscaling_resize"
        abort(422, errors={"json": {named: [f"the result would be {width}x{height}; each side must be at most "
                                            f"{most} (limits.max_size)"]}})


def html_info(info: dict[str, str], warnings: list[str]) -> str:
    """The web UI's html_info: its infotext as a paragraph (plaintext_to_html), then any lenient warnings."""
    lines = [infotext_line(info)] + warnings
    return "".join(f"<p>{html.escape(line)}</p>" for line in lines if line)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def upscale_here(images: list[InitImage], data: dict) -> list[str]:
    """The resamplers, on the API host: base64 PNGs."""
    out = []
    for init in images:
        with Image.open(io.BytesIO(init.data)) as opened:
            out.append(png_base64(run_extras(opened, data, pixel_resizer)))
    return out


def build_extras_jobspec(svc: Services, images: list[InitImage], data: dict, task_id: str) -> JobSpec:
    """The queued form: the images under the task's input prefix (the owner alone may read them), the fields.

    `model` is the default model only so the queue routes the job (no pipeline is loaded for it); width and
    height are the first result's; it runs alone (JobSpec.batch_key)."""
    keys = []
    for n, init in enumerate(images):
        key = svc.storage.input_key(task_id, f"extras{n}.{init.format}")
        svc.storage.put(key, init.data, init.content_type, metadata=task_metadata(task_id))
        keys.append(key)
    width, height = output_size(images[0].width, images[0].height, data)
    model = svc.catalog.default_model() or ""
    return JobSpec(prompt="", model=model, width=width, height=height, num_inference_steps=0, guidance_scale=0.0,
                   seed=0, num_images=len(images), dialect="a1111",
                   extras={**{name: data[name] for name in FIELDS}, "image_keys": keys})


def upscale_queued(svc: Services, images: list[InitImage], data: dict) -> list[str]:
    """A model upscaler: the request as a job on the queue, waited for as txt2img waits; its outputs as base64."""
    owner = current_key().owner
    task_id = new_task_id()
    submit_job(svc, owner, build_extras_jobspec(svc, images, data, task_id), task_id)
    svc.a1111.set_current_job(owner, task_id)
    task = wait_for_result(svc, task_id)
    if task.status is not TaskStatus.COMPLETED:
        raise ExtrasFailed(task.error or f"the extras job ended {task.status.value}")
    return [base64.b64encode(svc.storage.get(key)).decode() for key in task.result_keys]


def extras_answer(svc: Services, images: list[InitImage], data: dict) -> tuple[list[str], str]:
    """Checks first (face restorers, upscaler names, sizes), then each image upscaled: base64 PNGs and html_info."""
    warnings = screen_extras(svc, data)
    queued = check_upscalers(svc, data)
    for init in images:
        check_size(svc, init, data)
    out = upscale_queued(svc, images, data) if queued else upscale_here(images, data)
    return out, html_info(extras_info(data), warnings)


def answer_single(svc: Services, data: dict) -> dict[str, Any]:
    images, info = extras_answer(svc, [data["image"]], data)
    return {"html_info": info, "image": images[0]}


def answer_batch(svc: Services, data: dict) -> dict[str, Any]:
    images, info = extras_answer(svc, [item["data"] for item in data["imageList"]], data)
    return {"html_info": info, "images": images}
