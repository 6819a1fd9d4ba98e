"""The extras' upscale (A1111's /extra-single-image, /extra-batch-images), in the one form the API and the worker run.

Why shared: resamplers run on the API host (api/dialects/a1111/extras.py),
model upscalers on a worker (worker/extras.py, a queued JobSpec.extras job);
the sizes, the crop, the second upscaler's blend and the infotext entries are
the web UI's scripts/postprocessing_upscale.py and modules/upscaler.py either
way, so they live here once. What differs is only how one upscaler reaches a
size (a Resizer). No torch here: the API imports it.
"""
from __future__ import annotations

from typing import Callable

from PIL import Image

from common.upscalers import NO_UPSCALE, PIXEL_UPSCALERS, extras_size

# (image, exact factor, size floored to 8) -> the image at that size
Resizer = Callable[[Image.Image, float, tuple[int, int]], Image.Image]
# The request fields a queued extras job carries (JobSpec.extras, with "image_keys").
FIELDS = ("upscaler_1", "upscaler_2", "extras_upscaler_2_visibility", "resize_mode", "upscaling_resize",
          "upscaling_resize_w", "upscaling_resize_h", "upscaling_crop")


def pixel_resizer(name: str) -> Resizer:
    """A PIL resampler: the exact factor first, then Lanczos to the multiple of 8, as Upscaler.upscale does."""
    def resize(image: Image.Image, scale: float, dest: tuple[int, int]) -> Image.Image:
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                             resample=PIXEL_UPSCALERS[name])
        return image if image.size == dest else image.resize(dest, resample=Image.Resampling.LANCZOS)
    return resize


def wanted_upscalers(data: dict) -> list[tuple[str, str]]:
    """(field, name) of the upscalers a request runs: upscaler_1, and upscaler_2 when it is blended in."""
    if data["upscaler_1"] == NO_UPSCALE:
        return []
    wanted = [("upscaler_1", data["upscaler_1"])]
    if data["extras_upscaler_2_visibility"] > 0 and data["upscaler_2"] != NO_UPSCALE:
        wanted.append(("upscaler_2", data["upscaler_2"]))
    return wanted


def output_size(width: int, height: int, data: dict) -> tuple[int, int]:
    """The size the extras make of a width x height image (to check it against limits before any work)."""
    if data["upscaler_1"] == NO_UPSCALE:
        return width, height
    if data["resize_mode"] == 1 and data["upscaling_crop"]:
        return data["upscaling_resize_w"], data["upscaling_resize_h"]
    return extras_size(width, height, data["resize_mode"], data["upscaling_resize"], data["upscaling_resize_w"],
                       data["upscaling_resize_h"])


def extras_info(data: dict) -> dict[str, str]:
    """The web UI's infotext entries of an extras upscale (Postprocess upscale by/to, crop, upscaler(s))."""
    if data["upscaler_1"] == NO_UPSCALE:
        return {}
    mode, to_w, to_h = data["resize_mode"], data["upscaling_resize_w"], data["upscaling_resize_h"]
    info = {"Postprocess upscale to": f"{to_w}x{to_h}"} if mode == 1 else \
        {"Postprocess upscale by": f"{data['upscaling_resize']:g}"}
    if mode == 1 and data["upscaling_crop"]:
        info["Postprocess crop to"] = f"{to_w}x{to_h}"
    info["Postprocess upscaler"] = data["upscaler_1"]
    if len(wanted_upscalers(data)) > 1:
        info["Postprocess upscaler 2"] = data["upscaler_2"]
    return info


def upscale_once(image: Image.Image, data: dict, resize: Resizer) -> Image.Image:
    """One upscaler over the image, as the web UI's ScriptPostprocessingUpscale.upscale (size, then crop)."""
    mode, to_w, to_h = data["resize_mode"], data["upscaling_resize_w"], data["upscaling_resize_h"]
    dest = extras_size(image.width, image.height, mode, data["upscaling_resize"], to_w, to_h)
    image = resize(image, dest[0] / image.width, dest)
    if mode == 1 and data["upscaling_crop"]:
        cropped = Image.new("RGB", (to_w, to_h))
        cropped.paste(image, box=(to_w // 2 - image.width // 2, to_h // 2 - image.height // 2))
        image = cropped
    return image


def run_extras(image: Image.Image, data: dict, resizer_for: Callable[[str], Resizer]) -> Image.Image:
    """The image after the upscalers (upscaler_2 blended in at its visibility); `resizer_for(name)` runs one."""
    image = image.convert("RGB")
    wanted = wanted_upscalers(data)
    if not wanted:                      # upscaler_1 "None": the web UI skips the upscale step entirely
        return image
    upscaled = upscale_once(image, data, resizer_for(wanted[0][1]))
    if len(wanted) > 1:
        second = upscale_once(image, data, resizer_for(wanted[1][1]))
        upscaled = Image.blend(upscaled, second.convert(upscaled.mode), data["extras_upscaler_2_visibility"])
    return upscaled


def infotext_line(info: dict[str, str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in info.items())
