"""The A1111 hires fix fields -> JobSpec.hires: the upscaler, the sizes and the second pass's settings.

Why checked here: a hires fix job that cannot run (an upscaler no worker
has, a size past limits.max_size, a sampler the model cannot take) must be a
422 naming the web UI's own field before anything is queued, as the web UI
itself raises before sampling ("could not find upscaler named ...").
"""
from __future__ import annotations

from typing import Any

from flask_smorest import abort
from werkzeug.exceptions import HTTPException

from api.services import Services
from common.catalog import ModelInfo
from common.loratags import extract_loras
from common.upscalers import DEFAULT_HIRES_UPSCALER, HiresSize, hires_size, is_known

SAME = {"hr_sampler_name": "Use same sampler", "hr_scheduler": "Use same scheduler",
        "hr_checkpoint_name": "Use same checkpoint"}   # the web UI's dropdown value for "as the first pass"
CLASSIC_STRENGTH = 0.75   # the web UI's txt2img denoising_strength default (StableDiffusionProcessingTxt2Img)


def chosen(data: dict, name: str) -> str | None:
    """A second-pass override, or None when it is absent, empty or the web UI's "Use same ..."."""
    value = data.get(name)
    return None if value in (None, "", SAME.get(name)) else value


def hires_upscaler(svc: Services, data: dict) -> str:
    """hr_upscaler, by the web UI's names (latent modes, pixel upscalers, the ESRGAN-class files of
    models.upscalers_dir); a 422 naming it when unknown."""
    name = data.get("hr_upscaler") or DEFAULT_HIRES_UPSCALER
    if not is_known(name, svc.settings.upscalers_dir):
        abort(422, errors={"json": {"hr_upscaler": [
            f"upscaler {name!r} not found; see GET /sdapi/v1/upscalers and GET /sdapi/v1/latent-upscale-modes"]}})
    return name


def size_field(data: dict) -> str:
    """The field a hires size came from: hr_scale, or the hr_resize_x/y that was given."""
    if data.get("hr_resize_x"):
        return "hr_resize_x"
    return "hr_resize_y" if data.get("hr_resize_y") else "hr_scale"


def checked_size(svc: Services, data: dict, model: ModelInfo) -> HiresSize:
    """The upscaled and output sizes, rounded down to the family's multiple and within limits.min/max_size."""
    field = size_field(data)
    scale, resize_x, resize_y = data.get("hr_scale") or 0, data.get("hr_resize_x") or 0, data.get("hr_resize_y") or 0
    if field == "hr_scale" and scale <= 0 or resize_x < 0 or resize_y < 0:
        abort(422, errors={"json": {field: [f"{field} must be positive"]}})
    size = hires_size(data["width"], data["height"], scale, resize_x, resize_y, model.profile.size_multiple)
    limits = svc.settings.limits
    sides = (size.upscale_width, size.upscale_height, size.width, size.height)
    if not all(limits.min_size <= side <= limits.max_size for side in sides):
        abort(422, errors={"json": {field: [
            f"the hires fix would upscale {data['width']}x{data['height']} to {size.upscale_width}x"
            f"{size.upscale_height} (output {size.width}x{size.height}, multiples of "
            f"{model.profile.size_multiple}); each side must be within {limits.min_size}..{limits.max_size}"]}})
    return size


def hires_steps(svc: Services, data: dict) -> int:
    """hr_second_pass_steps: 0 is the first pass's steps, as in the web UI."""
    steps = data.get("hr_second_pass_steps") or 0
    if not 0 <= steps <= svc.settings.limits.max_steps:
        abort(422, errors={"json": {"hr_second_pass_steps": [
            f"must be within 0..{svc.settings.limits.max_steps} (0: as many as steps)"]}})
    return steps


def hires_strength(data: dict, model: ModelInfo, classic: bool) -> float:
    """denoising_strength, filled in place (so `parameters` echoes what ran): 0.75 as the web UI for SD 1.x/2.x,
    the model's img2img strength for the others."""
    if data.get("denoising_strength") is None:
        data["denoising_strength"] = CLASSIC_STRENGTH if classic else model.request_defaults.strength
    return data["denoising_strength"]


def hires_sampler(data: dict, warnings: list[str], model: ModelInfo, resolve: Any) -> dict[str, Any]:
    """The second pass's scheduler when hr_sampler_name or hr_scheduler differ from the first pass's; {} when not.

    `resolve` is translate.resolve_sampler; its 422s are renamed to the hires fields.
    """
    sampler, schedule = chosen(data, "hr_sampler_name"), chosen(data, "hr_scheduler")
    if sampler is None and schedule is None:
        return {}
    first = data.get("sampler_name") or data.get("sampler_index")     # as the first pass resolved it
    request = {"sampler_name": sampler or first, "sampler_index": None,
               "scheduler": schedule if schedule is not None else data.get("scheduler")}
    try:
        scheduler, config, name = resolve(request, warnings, model)
    except HTTPException as exc:
        errors = getattr(exc, "data", {}).get("errors", {}).get("json", {})
        renamed = {{"sampler_name": "hr_sampler_name", "scheduler": "hr_scheduler"}.get(k, k): v
                   for k, v in errors.items()}
        abort(422, errors={"json": renamed})
    chosen_schedule = request["scheduler"] if schedule is not None else None
    return {"scheduler": scheduler, "scheduler_config": config, "sampler_name": name if sampler else None,
            "schedule": chosen_schedule}


def hires_prompts(data: dict, prompt: str, model: ModelInfo) -> dict[str, str]:
    """hr_prompt / hr_negative_prompt when they differ from the first pass's (LoRA tags removed: the job's LoRAs
    apply to both passes); a hires negative prompt for a model without one is a 422 naming it."""
    out = {}
    hr_prompt = extract_loras(data.get("hr_prompt") or "")[0]
    if hr_prompt and hr_prompt != prompt:
        out["prompt"] = hr_prompt
    negative = data.get("hr_negative_prompt") or ""
    if negative and negative != (data.get("negative_prompt") or ""):
        if not model.profile.negative_prompt:
            abort(422, errors={"json": {"hr_negative_prompt": [
                f"{model.profile.label} models take no negative prompt; leave it empty"]}})
        out["negative_prompt"] = negative
    return out


def build_hires(svc: Services, data: dict, model: ModelInfo, prompt: str, warnings: list[str], classic: bool,
                resolve: Any, refiner: ModelInfo | None) -> dict[str, Any] | None:
    """JobSpec.hires for a txt2img request with enable_hr (None without it)."""
    if not data.get("enable_hr"):
        return None
    if refiner is not None:
        abort(422, errors={"json": {"enable_hr": [
            "the hires fix runs without a refiner pass here; leave refiner_checkpoint out or enable_hr false"]}})
    upscaler = hires_upscaler(svc, data)
    size = checked_size(svc, data, model)
    resize = f"{data.get('hr_resize_x') or 0}x{data.get('hr_resize_y') or 0}" if size_field(data) != "hr_scale" \
        else None
    return {"upscaler": upscaler, "upscale_width": size.upscale_width, "upscale_height": size.upscale_height,
            "width": size.width, "height": size.height, "steps": hires_steps(svc, data),
            "strength": hires_strength(data, model, classic), "scale": None if resize else data.get("hr_scale"),
            "resize": resize, **hires_sampler(data, warnings, model, resolve), **hires_prompts(data, prompt, model)}
