"""ControlNet at the worker: control images prepared as sd-webui-controlnet does, ControlNet models kept warm
with their base model, and the family's ControlNet view on the base's very weights.

Why here: preprocessing (canny) needs numpy/scipy and the output size, and
an inpainting job's "only masked" region crops the control image as it crops
the init image; loading needs torch. The API checked names, fit and values
(api/controlnet.py). What runs:
- each unit's image (its own, or the init image when the unit has none) is
  preprocessed ("none", or "canny" at processor_res on the short side), then
  fitted to the job's size by the unit's resize mode (Just Resize, Crop and
  Resize, Resize and Fill), as the extension fits its detected maps;
- several units are a MultiControlNetModel; each unit's weight, guidance
  start and end are diffusers' controlnet_conditioning_scale and
  control_guidance_start/end; "ControlNet is more important" is diffusers'
  guess_mode (the ControlNet sees the conditional half of the batch only,
  its residuals scaled from 0.1 to 1 by depth) - close to, not exactly, the
  extension's soft injection (docs/compat/a1111.md).
"""
from __future__ import annotations

import json
import logging
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.controlnets import CANNY_HIGH, CANNY_LOW, PROCESSOR_RES, find_controlnet, list_controlnets
from common.errors import ModelError
from common.jobspec import JobSpec

log = logging.getLogger("sdqueue.worker")

MAX_WARM_PER_MODEL = 4      # ControlNets kept warm beside one base model (least recently used dropped)
VIEW_CLASSES = {            # (family name, mode) -> diffusers pipeline class
    ("sd", "txt2img"): "StableDiffusionControlNetPipeline",
    ("sd", "img2img"): "StableDiffusionControlNetImg2ImgPipeline",
    ("sd", "inpaint"): "StableDiffusionControlNetInpaintPipeline",
    ("sdxl", "txt2img"): "StableDiffusionXLControlNetPipeline",
    ("sdxl", "img2img"): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLControlNetInpaintPipeline",
}


# --- preprocessing -----------------------------------------------------------------------------
def canny(image: Image.Image, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> Image.Image:
    """Canny edges (white on black, RGB) with OpenCV's cv2.Canny conventions: 3x3 Sobel gradients, their L1
    magnitude against `low`/`high`, non-maximum suppression in four directions, and hysteresis (weak edges
    kept where they touch a strong one, 8-connected). On the image's luminance."""
    from scipy import ndimage

    grey = np.asarray(image.convert("L"), dtype=np.float32)
    gx = ndimage.sobel(grey, axis=1, mode="nearest")
    gy = ndimage.sobel(grey, axis=0, mode="nearest")
    magnitude = np.abs(gx) + np.abs(gy)
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    padded = np.pad(magnitude, 1)
    h, w = magnitude.shape

    def neighbour(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    # direction bins: 0 (horizontal gradient), 45, 90, 135 degrees
    bins = ((angle < 22.5) | (angle >= 157.5), (angle >= 22.5) & (angle < 67.5),
            (angle >= 67.5) & (angle < 112.5), (angle >= 112.5) & (angle < 157.5))
    pairs = (((0, -1), (0, 1)), ((-1, -1), (1, 1)), ((-1, 0), (1, 0)), ((-1, 1), (1, -1)))
    peak = np.zeros_like(magnitude, dtype=bool)
    for chosen, (a, b) in zip(bins, pairs):
        peak |= chosen & (magnitude >= neighbour(*a)) & (magnitude > neighbour(*b))
    weak = peak & (magnitude > low)
    strong = peak & (magnitude > high)
    labels, count = ndimage.label(weak, structure=np.ones((3, 3), dtype=bool))
    keep = np.zeros(count + 1, dtype=bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False
    edges = (keep[labels] * 255).astype(np.uint8)
    return Image.fromarray(edges).convert("RGB")


def at_processor_res(image: Image.Image, res: int) -> Image.Image:
    """The image scaled so its short side is `res` (the extension's processor resolution)."""
    short = min(image.size)
    if res <= 0 or short == res:
        return image
    scale = res / short
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)


def border_colour(image: Image.Image) -> tuple[int, ...]:
    """The median colour of the image's edge pixels (Resize and Fill's padding for a picture)."""
    pixels = np.asarray(image.convert("RGB"))
    edge = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return tuple(int(v) for v in np.median(edge, axis=0))


def fit(image: Image.Image, width: int, height: int, mode: str, fill: tuple[int, ...] = (0, 0, 0)) -> Image.Image:
    """The extension's resize modes: just_resize stretches; crop_and_resize covers the size and crops the centre;
    resize_and_fill fits inside it and pads with `fill`."""
    image = image.convert("RGB")
    if mode == "just_resize" or image.size == (width, height):
        return image.resize((width, height), Image.LANCZOS)
    cover = mode == "crop_and_resize"
    scale = (max if cover else min)(width / image.width, height / image.height)
    scaled = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    if cover:
        left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new("RGB", (width, height), fill)
    canvas.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
    return canvas


def control_image(unit: dict, image: Image.Image, width: int, height: int) -> Image.Image:
    """One unit's control image at width x height: preprocessed, then fitted by its resize mode."""
    image = image.convert("RGB")
    fill = border_colour(image)
    if unit.get("preprocessor", "none") == "canny":
        image = canny(at_processor_res(image, int(unit.get("processor_res") or PROCESSOR_RES)),
                      float(unit.get("low", CANNY_LOW)), float(unit.get("high", CANNY_HIGH)))
        fill = (0, 0, 0)
    elif unit.get("preprocessor", "none") != "none":
        raise ModelError(f"ControlNet preprocessor {unit.get('preprocessor')!r} is not run by this worker")
    return fit(image, width, height, unit.get("resize_mode", "crop_and_resize"), fill)


def control_images(spec: JobSpec, images: list[Image.Image | None], init_image: Image.Image | None) -> list[Image.Image]:
    """Every unit's control image for the pipeline call; an inpainting job's "only masked" region is cut from
    the control image fitted to the init image's size, as the init image is cut (worker/inpaint.py)."""
    out = []
    for unit, image in zip(spec.controlnet or [], images):
        image = image if image is not None else init_image
        if image is None:
            raise ModelError(f"ControlNet unit for {unit.get('model')} has no image (and the job no init image)")
        if spec.mode == "inpaint" and spec.inpaint_area and init_image is not None:
            whole = control_image(unit, image, *init_image.size)
            out.append(whole.crop(tuple(spec.inpaint_area)).resize((spec.width, spec.height), Image.LANCZOS))
        else:
            out.append(control_image(unit, image, spec.width, spec.height))
    return out


# --- models -------------------------------------------------------------------------------------
_WARM: "weakref.WeakKeyDictionary[Any, OrderedDict[str, Any]]" = weakref.WeakKeyDictionary()
_CONFIGS: dict[str, Path] = {}


def controlnet_models(base: Any, spec: JobSpec, folder: Path) -> list[Any]:
    """The job's ControlNet models, loaded beside `base` (its device and dtype) and kept warm with it: they are
    dropped when the registry drops the base, or when more than MAX_WARM_PER_MODEL were used with it."""
    warm = _WARM.setdefault(base, OrderedDict())
    available = list_controlnets(folder)
    models = []
    for unit in spec.controlnet or []:
        info = find_controlnet(available, unit["model"])
        if info is None:
            raise ModelError(f"ControlNet '{unit['model']}' is not in the ControlNet directory")
        key = f"{info.path}:{info.path.stat().st_mtime_ns}"
        if key not in warm:
            while len(warm) >= MAX_WARM_PER_MODEL:
                warm.popitem(last=False)
            warm[key] = load_controlnet(base, info)
        warm.move_to_end(key)
        models.append(warm[key])
    return models


def load_controlnet(base: Any, info: Any) -> Any:
    """A ControlNetModel in the base's dtype, on its device: a diffusers folder, or a single file with a config
    made from the base's UNet (ControlNet's encoder is a copy of it)."""
    from diffusers import ControlNetModel

    dtype, device = base.unet.dtype, base.unet.device
    if info.kind == "diffusers":
        model = ControlNetModel.from_pretrained(str(info.path), torch_dtype=dtype, local_files_only=True)
    else:
        model = ControlNetModel.from_single_file(str(info.path), config=str(unet_config_folder(base)),
                                                 torch_dtype=dtype, local_files_only=True)
    log.info("loaded ControlNet %s", info.name)
    return model.to(device)


def unet_config_folder(base: Any) -> Path:
    """A folder with a ControlNetModel config.json made from the base UNet's config (for single files)."""
    import inspect

    from diffusers import ControlNetModel

    config = dict(base.unet.config)
    wanted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    data = {k: v for k, v in config.items() if k in wanted}
    data.update(in_channels=4, _class_name="ControlNetModel")
    text = json.dumps(data, sort_keys=True, default=list)
    if text not in _CONFIGS:
        folder = Path(tempfile.mkdtemp(prefix="sdq-cn-config-"))
        (folder / "config.json").write_text(text)
        _CONFIGS[text] = folder
    return _CONFIGS[text]


# --- the view and its arguments --------------------------------------------------------------------
def controlnet_view(base: Any, family: Any, spec: JobSpec, scheduler: Any, models: list[Any]) -> Any:
    """The family's ControlNet pipeline for the job's mode on the base's weights (share_weights), with one
    ControlNet or a MultiControlNetModel of several."""
    import diffusers
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from worker.pipelines.base import share_weights

    name = VIEW_CLASSES.get((family.name, spec.mode))
    if name is None:
        raise ModelError(f"ControlNet is not run with {family.profile.label} models")
    controlnet = models[0] if len(models) == 1 else MultiControlNetModel(models)
    return share_weights(getattr(diffusers, name), base, scheduler=scheduler, controlnet=controlnet)


def control_kwargs(spec: JobSpec, images: list[Image.Image]) -> dict[str, Any]:
    """The ControlNet arguments of the call: the control image(s) (`image` for txt2img, `control_image` beside
    the init image otherwise), each unit's weight and guidance window, and guess mode."""
    units = spec.controlnet or []
    one = len(units) == 1
    kwargs = {"controlnet_conditioning_scale": units[0]["scale"] if one else [u["scale"] for u in units],
              "control_guidance_start": units[0]["start"] if one else [u["start"] for u in units],
              "control_guidance_end": units[0]["end"] if one else [u["end"] for u in units],
              "guess_mode": all(u.get("guess_mode") for u in units)}
    kwargs["image" if spec.mode == "txt2img" else "control_image"] = images[0] if one else images
    return kwargs
