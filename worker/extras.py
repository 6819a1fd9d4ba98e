"""The A1111 extras with a model upscaler, as a queued job (JobSpec.extras): the images upscaled, nothing else.

Why no pipeline: an extras job needs only the ESRGAN-class network, so
execute runs it before any diffusion model is looked up or loaded. The sizes,
crop, blend and infotext are common/extras.py, the same the API host runs for
the resamplers; a model upscaler reaches its size as in the hires fix
(worker/esrgan.py upscale_to: the model until it covers the size, then
Lanczos). Device and dtype: the worker's own device; float32 on CPU, and on
CUDA worker.dtype when it names one, else float16 (Real-ESRGAN's own half
precision default, and the dtype the SD families' pipelines run in), so the
result does not depend on which model happens to be warm. The networks are
cached per worker process (MAX_WARM of them, least recently used dropped),
apart from those kept with a pipeline for the hires fix.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from PIL import Image

from common.errors import ModelError
from common.extras import pixel_resizer, run_extras
from common.jobspec import JobSpec
from common.upscalers import PIXEL_UPSCALERS, list_model_upscalers
from worker.generation import GenerationResult

MAX_WARM = 2    # extras networks one worker keeps loaded (a few MB each in practice; small next to a pipeline)
_WARM: "OrderedDict[tuple[str, str, str], Any]" = OrderedDict()


def extras_dtype(setting: str, device: str) -> str:
    """The dtype an extras network runs in on `device` (worker.dtype `setting`)."""
    if not device.startswith("cuda"):
        return "float32"
    return "float16" if setting == "auto" else setting


def extras_network(path: Any, device: str, dtype: str) -> Any:
    """The network at `path` on `device` in `dtype`, cached per worker (keyed by file and mtime)."""
    import torch

    from worker.esrgan import load_network

    key = (f"{path}:{path.stat().st_mtime_ns}", device, dtype)
    if key not in _WARM:
        while len(_WARM) >= MAX_WARM:
            _WARM.popitem(last=False)
        _WARM[key] = load_network(path, device, getattr(torch, dtype))
    _WARM.move_to_end(key)
    return _WARM[key]


def model_resizers(ctx: Any, spec: JobSpec, monitor: Any) -> dict[str, Any]:
    """upscaler name -> Resizer for the job's upscalers; loading a network counts as setup."""
    from worker.esrgan import upscale_to

    data = spec.extras or {}
    models = list_model_upscalers(ctx.settings.upscalers_dir)
    device = ctx.info.device or "cpu"
    dtype = extras_dtype(ctx.settings.worker.dtype, device)
    resizers: dict[str, Any] = {}
    for name in {data["upscaler_1"], data["upscaler_2"]}:
        if name in PIXEL_UPSCALERS:
            resizers[name] = pixel_resizer(name)
        elif name in models:
            monitor.enter_setup()
            try:
                network = extras_network(models[name].path, device, dtype)
            finally:
                monitor.leave_setup()
            resizers[name] = lambda image, _scale, dest, network=network: upscale_to(network, image, *dest)
    return resizers


def run_extras_job(ctx: Any, spec: JobSpec, monitor: Any) -> GenerationResult:
    """Each stored image through the extras' upscalers, in order (the outputs keep the request's order)."""
    from worker.jobs import load_input_image

    data = spec.extras or {}
    resizers = model_resizers(ctx, spec, monitor)

    def resizer_for(name: str) -> Any:
        if name not in resizers:
            raise ModelError(f"upscaler '{name}' is not in the upscalers directory")
        return resizers[name]

    images: list[Image.Image] = []
    for key in data["image_keys"]:
        images.append(run_extras(load_input_image(ctx.storage, key), data, resizer_for))
    return GenerationResult(images=images, seeds=[spec.seed] * len(images), scheduler="", strength=None)
