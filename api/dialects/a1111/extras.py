"""The web UI's extras tab (`/extra-single-image`, `/extra-batch-images`): upscaling an image, nothing else.

Why on the API host: the extras run the PIL resamplers (common/upscalers.py);
they need no model and no GPU, and a bounded image (limits.max_size) resizes
in milliseconds, so a round trip through the queue would only add latency.
The ESRGAN-class models of GET /upscalers need torch, which the API host
does not have: naming one is a 422 saying they run in the hires fix only
(running them here would mean a new job kind through the queue). Face restoration (GFPGAN, CodeFormer) is not
run: a visibility above 0 is a 422 naming the field, as the A1111 field
table refuses what it would not run (or, for a lenient key, named in
html_info).

Sizes, crop and the second upscaler's blend follow the web UI's
scripts/postprocessing_upscale.py and modules/upscaler.py.
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
from common.upscalers import NO_UPSCALE, PIXEL_UPSCALERS, extras_size, list_model_upscalers

FACE_RESTORERS = {"gfpgan_visibility": "GFPGAN face restoration is not run by sdqueue",
                  "codeformer_visibility": "CodeFormer face restoration is not run by sdqueue"}


def screen_extras(svc: Services, data: dict) -> list[str]:
    """Face restorers that are on: a 422 naming each, or warnings for a lenient key."""
    found = [Refusal((name,), note) for name, note in FACE_RESTORERS.items() if data.get(name)]
    if found and not current_key().is_lenient(svc.settings.api.lenient):
        abort(422, errors={"json": nested_errors(found)})
    return [refusal.warning for refusal in found]


def check_upscalers(svc: Services, data: dict) -> None:
    """upscaler_1 and (when it is blended in) upscaler_2 must be resamplers: the model upscalers of
    GET /upscalers need a worker's torch and run in the hires fix only (a 422 that says so)."""
    wanted = [("upscaler_1", data["upscaler_1"])]
    if data["extras_upscaler_2_visibility"] > 0:
        wanted.append(("upscaler_2", data["upscaler_2"]))
    models = list_model_upscalers(svc.settings.upscalers_dir)
    errors = {field: [f"upscaler {name!r} is a model upscaler; model upscalers run in the hires fix only "
                      f"(txt2img hr_upscaler), the extras run {', '.join(PIXEL_UPSCALERS)}" if name in models else
                      f"upscaler {name!r} not found; see GET /sdapi/v1/upscalers"]
              for field, name in wanted if name not in PIXEL_UPSCALERS}
    if errors:
        abort(422, errors={"json": errors})


def upscale_once(image: Image.Image, name: str, data: dict) -> tuple[Image.Image, dict[str, str]]:
    """One upscaler over the image, as the web UI's ScriptPostprocessingUpscale.upscale, and its infotext."""
    mode, to_w, to_h = data["resize_mode"], data["upscaling_resize_w"], data["upscaling_resize_h"]
    info = {"Postprocess upscale to": f"{to_w}x{to_h}"} if mode == 1 else \
        {"Postprocess upscale by": f"{data['upscaling_resize']:g}"}
    dest = extras_size(image.width, image.height, mode, data["upscaling_resize"], to_w, to_h)
    scale = dest[0] / image.width
    # The resampler first (to the exact factor), then Lanczos to the multiple of 8, as Upscaler.upscale does.
    image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                         resample=PIXEL_UPSCALERS[name])
    if image.size != dest:
        image = image.resize(dest, resample=Image.Resampling.LANCZOS)
    if mode == 1 and data["upscaling_crop"]:
        cropped = Image.new("RGB", (to_w, to_h))
        cropped.paste(image, box=(to_w // 2 - image.width // 2, to_h // 2 - image.height // 2))
        image = cropped
        info["Postprocess crop to"] = f"{to_w}x{to_h}"
    return image, info


def output_size(init: InitImage, data: dict) -> tuple[int, int]:
    """The size the extras make of an image (to check it against limits before any work)."""
    if data["resize_mode"] == 1 and data["upscaling_crop"]:
        return data["upscaling_resize_w"], data["upscaling_resize_h"]
    return extras_size(init.width, init.height, data["resize_mode"], data["upscaling_resize"],
                       data["upscaling_resize_w"], data["upscaling_resize_h"])


def check_size(svc: Services, init: InitImage, data: dict, field: str) -> None:
    """Each side of the result within limits.max_size (a 422 naming the size field that asked for more)."""
    if data["upscaler_1"] == NO_UPSCALE:
        return
    width, height = output_size(init, data)
    most = svc.settings.limits.max_size
    if max(width, height) > most:
        named = "upscaling_resize_w" if data["resize_mode"] == 1 else "upscaling_resize"
        abort(422, errors={"json": {named: [f"the result would be {width}x{height}; each side must be at most "
                                            f"{most} (limits.max_size)"]}})


def run_extras(init: InitImage, data: dict) -> tuple[Image.Image, dict[str, str]]:
    """The image after the upscalers, and the web UI's infotext entries for it."""
    with Image.open(io.BytesIO(init.data)) as opened:
        image = opened.convert("RGB")
    if data["upscaler_1"] == NO_UPSCALE:        # the web UI skips the upscale step entirely
        return image, {}
    upscaled, info = upscale_once(image, data["upscaler_1"], data)
    info["Postprocess upscaler"] = data["upscaler_1"]
    visibility = data["extras_upscaler_2_visibility"]
    if visibility > 0 and data["upscaler_2"] != NO_UPSCALE:
        second, _ = upscale_once(image, data["upscaler_2"], data)
        upscaled = Image.blend(upscaled, second.convert(upscaled.mode), visibility)
        info["Postprocess upscaler 2"] = data["upscaler_2"]
    return upscaled, info


def html_info(info: dict[str, str], warnings: list[str]) -> str:
    """The web UI's html_info: its infotext as a paragraph (plaintext_to_html), then any lenient warnings."""
    lines = [", ".join(f"{k}: {v}" for k, v in info.items())] + warnings
    return "".join(f"<p>{html.escape(line)}</p>" for line in lines if line)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def extras_answer(svc: Services, images: list[InitImage], data: dict, field: str) -> tuple[list[str], str]:
    """Checks first (face restorers, upscaler names, sizes), then each image upscaled: base64 PNGs and html_info."""
    warnings = screen_extras(svc, data)
    check_upscalers(svc, data)
    for init in images:
        check_size(svc, init, data, field)
    out, info = [], {}
    for init in images:
        image, info = run_extras(init, data)
        out.append(png_base64(image))
    return out, html_info(info, warnings)


def answer_single(svc: Services, data: dict) -> dict[str, Any]:
    images, info = extras_answer(svc, [data["image"]], data, "image")
    return {"html_info": info, "image": images[0]}


def answer_batch(svc: Services, data: dict) -> dict[str, Any]:
    images, info = extras_answer(svc, [item["data"] for item in data["imageList"]], data, "imageList")
    return {"html_info": info, "images": images}
