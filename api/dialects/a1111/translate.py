"""The AUTOMATIC1111 web UI API's translation: A1111 request -> canonical JobSpec, task -> A1111's answer.

Why public: SD on EKS and the AWS SD extension API carry A1111 parameters;
they import `build_a1111_jobspec`, `echo_parameters`, `find_checkpoint` and
`screen_fields` from this package rather than translating a second time.
"""
from __future__ import annotations

import base64
import io
import os
import time
from typing import Any, Sequence

from flask_smorest import abort
from PIL import Image

from api.auth import current_key
from api.controlnet import plan_controlnet
from api.dialects.a1111.controlnet import a1111_units
from api.dialects.a1111.fields import Refusal, nested_errors, refusals
from api.dialects.a1111.hires import build_hires
from api.init_image import InitImage
from api.inpaint import FILLS, InpaintPlan, plan_inpaint
from api.modelfit import DEFAULT_REFINER_SWITCH, abort_unless_fits, image_size
from api.services import Services
from api.submission import resolve_seed
from common.catalog import ModelInfo, lora_problem, model_sha256
from common.infotext import SCHEDULE_LABELS, generation_info, hires_params, parse_infotext
from common.jobspec import JobSpec, LoraRef
from common.loratags import extract_loras
from api.loras import owned_loras
from common.promptsyntax import A1111, WEIGHTED_FAMILIES, uses_syntax
from common.families import FLOW
from common.samplers import (FLOW_FALLBACK, FLOW_SCHEDULE_TYPES, find_sampler, find_schedule_type, is_known_sampler,
                             samplers_for, scheduler_for)
from common.storage import task_metadata
from common.store import Task, TaskStatus


DIALECT = "a1111"
OUTDIRS = {"txt2img": "outputs/txt2img-images", "img2img": "outputs/img2img-images"}
FALLBACK_SAMPLER = "DPM++ 2M"    # what A1111 1.9+ silently uses for an unknown sampler name
CLASSIC_FAMILIES = ("sd1", "sd2")   # the models A1111's own API defaults were chosen for
# A1111's API defaults for SD 1.x/2.x models; dialects that carry A1111 bodies pass their own (the AWS template's).
A1111_DEFAULTS = {"steps": 50, "cfg_scale": 7.0, "sampler": "Euler"}
A1111_PREVIEW_EVERY = 10       # the web UI's default show_progress_every_n_steps (its live previews are on by default)
A1111_FIELDS = {"model": "sd_model_checkpoint", "width": "width", "height": "height",
                "negative_prompt": "negative_prompt", "refiner": "refiner_checkpoint", "mask": "mask"}


def saved_copy_dir(mode: str, owner: str) -> str:
    """Where `save_images` copies go: the web UI's folder, then the key's owner id, so that each key's copies
    are numbered on their own (one counter per folder) and never sit among another key's."""
    return f"{OUTDIRS[mode]}/{owner}"


def model_title(model: ModelInfo) -> str:
    return f"{model.name} [{model_sha256(model)[:10]}]"


def model_stem(model: ModelInfo) -> str:
    return os.path.splitext(model.name)[0] if model.kind == "single_file" else model.name


def find_checkpoint(svc: Services, title: str) -> ModelInfo | None:
    """A model by any name A1111 accepts: title, file name, name without extension, short or full hash."""
    wanted = title.strip()
    for model in svc.catalog.models():
        sha = model_sha256(model)
        if wanted in (model.name, model_stem(model), model_title(model), sha, sha[:10]):
            return model
        if wanted.endswith("]") and wanted.rsplit(" [", 1)[0] in (model.name, model_stem(model)):
            return model
    return None


def stored_options(svc: Services, owner: str) -> dict[str, Any]:
    return svc.a1111.options(owner)


def default_options(svc: Services) -> dict[str, Any]:
    default = svc.catalog.default_model()
    model = svc.catalog.model(default) if default else None
    return {
        "samples_save": True, "samples_format": "png", "samples_filename_pattern": "", "save_images_add_number": True,
        "grid_save": False, "outdir_samples": "", "outdir_txt2img_samples": OUTDIRS["txt2img"],
        "outdir_img2img_samples": OUTDIRS["img2img"], "save_to_dirs": True, "directories_filename_pattern": "[date]",
        "sd_model_checkpoint": model_title(model) if model else None, "sd_checkpoint_hash": model_sha256(model) if model else None,
        "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "enable_pnginfo": True, "face_restoration": False,
        "face_restoration_model": None, "eta_noise_seed_delta": 0, "sd_lora": "None",
        "live_previews_enable": True, "show_progress_every_n_steps": A1111_PREVIEW_EVERY,
    }


def a1111_preview_every(options: dict[str, Any]) -> int:
    """Steps between the live previews /progress shows as current_image: the web UI's options
    live_previews_enable and show_progress_every_n_steps (`options`: the key's /options under override_settings);
    0 when off (or -1: the web UI then shows one only after a batch, which a finished job's images are)."""
    if options.get("live_previews_enable", True) in (False, "false", 0):
        return 0
    try:
        every = int(options.get("show_progress_every_n_steps", A1111_PREVIEW_EVERY))
    except (TypeError, ValueError):
        return A1111_PREVIEW_EVERY
    return max(0, every)


def chosen_model(svc: Services, owner: str, overrides: dict | None, warnings: list[str],
                 stored: dict[str, Any] | None = None) -> ModelInfo:
    """override_settings.sd_model_checkpoint, else the key's /options choice (`stored`, when the caller read
    them already), else the default model."""
    wanted = (overrides or {}).get("sd_model_checkpoint")
    if wanted:
        model = find_checkpoint(svc, str(wanted))
        if model is not None:
            return model
        warnings.append(f"override_settings.sd_model_checkpoint {wanted!r} not found; the current model was used")
    chosen = (stored if stored is not None else stored_options(svc, owner)).get("sd_model_checkpoint")
    model = find_checkpoint(svc, chosen) if chosen else None
    if model is None:
        default = svc.catalog.default_model()
        model = svc.catalog.model(default) if default else None
    if model is None:
        abort(503, message="no model is available yet; add one to the model directory")
    return model


def screen_fields(svc: Services, data: dict, mode: str, extra: Sequence[Refusal] = ()) -> list[str]:
    """Values sdqueue would not run as asked (fields.py, and a dialect's own `extra`): a 422 naming each, in the
    serving dialect's error shape, or for a lenient key (api.lenient) warnings for info. [] when all run."""
    found = refusals(data, mode) + list(extra)
    if not found:
        return []
    if not current_key().is_lenient(svc.settings.api.lenient):
        abort(422, errors={"json": nested_errors(found)})
    return [refusal.warning for refusal in found]


def resolve_sampler(data: dict, warnings: list[str], model: ModelInfo,
                    default_sampler: str = "Euler") -> tuple[str, dict, str]:
    """(diffusers class, config, A1111 name) for sampler_name/sampler_index and scheduler, as A1111 1.9+ resolves
    them, for the model's kind of schedule: on SD3 and Flux "Euler" is the flow-matching Euler.

    A name no model knows falls back as A1111 does (with a warning); a
    sampler that exists but cannot run this model is a 422 naming the field.
    """
    schedule = model.profile.schedule
    only = model.profile.only_schedulers
    field = "sampler_name" if data.get("sampler_name") else "sampler_index"
    name = data.get("sampler_name") or data.get("sampler_index")
    if not name:
        name = data["sampler_name"] = data["sampler_index"] = default_sampler if schedule != FLOW else FLOW_FALLBACK
    found = find_sampler(name, schedule)
    if found is None or (only and found[0].scheduler not in only):
        if found is not None or is_known_sampler(name):
            usable = ", ".join(s.name for s in samplers_for(schedule) if not only or s.scheduler in only)
            abort(422, errors={"json": {field: [f"sampler {name!r} does not apply to {model.profile.label} models "
                                                f"({schedule} schedule); use one of {usable}"]}})
        fallback = FLOW_FALLBACK if schedule == FLOW else FALLBACK_SAMPLER
        warnings.append(f"sampler {name!r} not found; {fallback} was used (as A1111 does)")
        name = fallback
    label = None
    if data.get("scheduler"):
        label = find_schedule_type(data["scheduler"])
        if label is None:
            warnings.append(f"scheduler {data['scheduler']!r} not found; Automatic was used")
        elif schedule == FLOW and label not in FLOW_SCHEDULE_TYPES:
            abort(422, errors={"json": {"scheduler": [
                f"schedule type {label!r} does not apply to {model.profile.label} models; use one of "
                + ", ".join(FLOW_SCHEDULE_TYPES)]}})
        elif schedule == FLOW and label not in ("Automatic", "Uniform") and not find_sampler(name, FLOW)[0].karras:
            abort(422, errors={"json": {"scheduler": [
                f"schedule type {label!r} does not apply to the {name} sampler (its sigmas are fixed); "
                "use Automatic, or the Euler sampler"]}})
    return scheduler_for(name, None if label in (None, "Automatic") else label, schedule)


def fill_model_defaults(svc: Services, data: dict, model: ModelInfo, mode: str,
                        classic_defaults: dict = A1111_DEFAULTS) -> None:
    """Fill what the request left out, in place (so `parameters` echoes what ran).

    SD 1.x/2.x get A1111's own defaults (512², 50 steps, CFG 7, strength
    0.75); SDXL, SD3 and Flux their model's (1024², the family's steps,
    guidance and strength), and an img2img the init image's size. Sizes are
    rounded down to the family's multiple, as A1111 rounds to 8, and must
    then be within limits.min_size..max_size (a 422 naming the field, or
    init_images when the size came from it). models.overrides wins for
    every family.
    """
    configured = svc.catalog.overrides.get(model.name) or {}
    defaults = model.request_defaults
    sent = {name for name in ("width", "height") if data.get(name) is not None}
    classic = model.family in CLASSIC_FAMILIES
    init = (data.get("init_images") or [None])[0] if mode == "img2img" else None
    for name, own in (("steps", defaults.steps), ("cfg_scale", defaults.guidance_scale)):
        if data.get(name) is None:
            canonical = {"cfg_scale": "guidance_scale"}.get(name, name)
            data[name] = classic_defaults[name] if classic and canonical not in configured else own
    for name in ("width", "height"):
        if data.get(name) is None:
            if classic and name not in configured:
                data[name] = 512
            elif init is not None:
                data[name] = getattr(init, name)
            else:
                data[name] = getattr(defaults, name)
    data["width"], data["height"] = image_size(data["width"], data["height"], model)
    if mode == "img2img" and data.get("denoising_strength") is None:
        data["denoising_strength"] = 0.75 if classic and "strength" not in configured else defaults.strength
    limits = svc.settings.limits
    for name in ("width", "height"):
        if not limits.min_size <= data[name] <= limits.max_size:
            field = name if init is None or name in sent else "init_images"
            abort(422, errors={"json": {field: [
                f"{name} {data[name]} (after rounding to a multiple of {model.profile.size_multiple}) is outside "
                f"{limits.min_size}..{limits.max_size}"]}})


def a1111_inpaint_plan(data: dict, init: InitImage, size: tuple[int, int]) -> InpaintPlan:
    """The mask and region the web UI would use: mask_blur (else mask_blur_x/_y), inpainting_mask_invert,
    inpaint_full_res ("only masked", with its padding) and inpainting_fill 0/1 (fill/original)."""
    blur = data.get("mask_blur")
    blur_x, blur_y = (blur, blur) if blur is not None else (data["mask_blur_x"], data["mask_blur_y"])
    return plan_inpaint(data["mask"], init, *size, blur_x=blur_x, blur_y=blur_y,
                        invert=bool(data.get("inpainting_mask_invert")), only_masked=bool(data.get("inpaint_full_res")),
                        padding=data.get("inpaint_full_res_padding") or 0,
                        fill=FILLS[data.get("inpainting_fill") or 0])


def prompt_loras(svc: Services, prompt: str, warnings: list[str], model: ModelInfo,
                 extra: frozenset[str] = frozenset()) -> tuple[str, list[LoraRef], list[dict]]:
    """The prompt without its `<lora:name:weight>` tags, the LoRAs they name that exist and fit `model`, and the
    files a worker fetches for the key's own LoRAs among them (api/loras.py).

    As A1111 does, a tag naming an unknown LoRA, or one of another model
    generation, is skipped with a warning, not refused. `extra`: names the
    dialect makes available besides the LoRA directory (the AWS extension's
    uploaded LoRAs, checked when the worker loads them).
    """
    cleaned, loras, problems = extract_loras(prompt)
    warnings.extend(problems)
    files = svc.catalog.loras()
    elsewhere = [lora.name for lora in loras if lora.name not in files and lora.name not in extra]
    owned = owned_loras(svc, current_key().owner) if elsewhere else {}
    usable, assets = [], []
    for lora in loras:
        mine = owned.get(lora.name) if lora.name in elsewhere else None
        if mine is not None:
            misfit = mine.problem_with(model)
        else:
            misfit = lora_problem(files[lora.name], model) if lora.name in files else None
        if lora.name in elsewhere and mine is None:
            warnings.append(f"<lora:{lora.name}>: no such LoRA; the tag was ignored")
        elif misfit:
            warnings.append(f"<lora:{lora.name}>: does not fit {model.name} ({misfit}); the tag was ignored")
        elif mine is not None:
            usable.append(LoraRef(mine.local_name, lora.weight))
            assets.append(mine.asset)
        else:
            usable.append(lora)
    return cleaned, usable, assets


def prompt_syntax_for(model: ModelInfo, texts: dict[str, str | None], warnings: list[str]) -> str | None:
    """A1111's prompt syntax wherever sdqueue encodes the prompts (SD 1.x/2.x, SDXL); SD3 and Flux take them as
    written, noted in `warnings` when they use the syntax (a Flux prompt with parentheses must not fail)."""
    if model.family in WEIGHTED_FAMILIES:
        return A1111
    used = [name for name, text in texts.items() if uses_syntax(text)]
    if used:
        warnings.append(f"{' and '.join(used)}: A1111's emphasis syntax ((word:1.2), [word], BREAK) is not applied "
                        f"to {model.profile.label} models; the text was used as written")
    return None


def build_a1111_jobspec(svc: Services, data: dict, mode: str, task_id: str, warnings: list[str],
                        model: ModelInfo | None = None, dialect: str = DIALECT,
                        extra_loras: frozenset[str] = frozenset(), classic_defaults: dict = A1111_DEFAULTS) -> JobSpec:
    """A1111 request (validated) -> canonical job; uploads the init image and mask first.

    Also the translation of the dialects that carry A1111 parameters (SD on
    EKS, the AWS extension), which name the model themselves (`model`) and
    may have their own defaults for SD 1.x/2.x models (`classic_defaults`).
    """
    overrides = data.get("override_settings")
    stored = stored_options(svc, current_key().owner) if dialect == DIALECT else None   # read once per request
    model = model or chosen_model(svc, current_key().owner, overrides, warnings, stored)
    if not current_key().may_use_model(model.name):
        abort(403, message=f"this API key may not use model '{model.name}'")
    refiner = chosen_refiner(svc, data)
    fill_model_defaults(svc, data, model, mode, classic_defaults)
    scheduler, config, sampler_name = resolve_sampler(data, warnings, model, classic_defaults["sampler"])
    width, height, init_key, mask_key, strength, plan = data["width"], data["height"], None, None, None, None
    inpaint = mode == "img2img" and data.get("mask") is not None
    switch = data.get("refiner_switch_at") or DEFAULT_REFINER_SWITCH
    abort_unless_fits(model, mode="inpaint" if inpaint else mode, width=width, height=height,
                      negative_prompt=data.get("negative_prompt"), refiner=refiner, steps=data["steps"],
                      refiner_switch=switch, names=A1111_FIELDS)
    if mode == "img2img":
        init = data["init_images"][0]      # several are refused unless lenient (fields.py)
        init_key = svc.storage.input_key(task_id, f"init.{init.format}")
        svc.storage.put(init_key, init.data, init.content_type, metadata=task_metadata(task_id))
        strength = data["denoising_strength"]
        if data.get("mask") is not None:
            plan = a1111_inpaint_plan(data, init, (width, height))
            mask_key = svc.storage.input_key(task_id, "mask.png")
            svc.storage.put(mask_key, plan.mask_png, "image/png", metadata=task_metadata(task_id))
    if data.get("disable_extra_networks"):     # the web UI strips the tags and applies none
        prompt, loras, assets = extract_loras(data["prompt"])[0], [], []
    else:
        prompt, loras, assets = prompt_loras(svc, data["prompt"], warnings, model, extra_loras)
    syntax = prompt_syntax_for(model, {"prompt": prompt, "negative_prompt": data.get("negative_prompt")}, warnings)
    hires = build_hires(svc, data, model, prompt, warnings, model.family in CLASSIC_FAMILIES, resolve_sampler,
                        refiner) if mode == "txt2img" else None
    controlnet = a1111_controlnet(svc, data, model, task_id, mode, hires, refiner)
    return JobSpec(
        prompt=prompt, negative_prompt=data.get("negative_prompt") or None, model=model.name,
        width=width, height=height, num_images=data["batch_size"] * data["n_iter"], batch_size=data["batch_size"],
        num_inference_steps=data["steps"], guidance_scale=data["cfg_scale"], strength=strength,
        scheduler=scheduler, scheduler_config=config, sampler_name=sampler_name, seed=resolve_seed(data["seed"]),
        init_image_key=init_key, mask_image_key=mask_key,
        loras=loras, assets=assets, dialect=dialect,
        save_copy_dir=saved_copy_dir(mode, current_key().owner) if data.get("save_images") else None,
        refiner=refiner.name if refiner else None,
        refiner_switch=switch if refiner else None, family=model.family, prompt_syntax=syntax,
        inpaint_fill=plan.fill if plan else None, inpaint_area=plan.area if plan else None, hires=hires,
        controlnet=controlnet,
        preview_every=a1111_preview_every({**stored, **(overrides or {})}) if stored is not None else 0,
    )


def a1111_controlnet(svc: Services, data: dict, model: ModelInfo, task_id: str, mode: str, hires: dict | None,
                     refiner: ModelInfo | None) -> list[dict] | None:
    """JobSpec.controlnet from alwayson_scripts.controlnet (api/dialects/a1111/controlnet.py); the hires fix and
    the refiner pass do not run with ControlNet (a 422 naming enable_hr / refiner_checkpoint)."""
    units = a1111_units(data)
    if not units:
        return None
    if hires:
        abort(422, errors={"json": {"enable_hr": [
            "the hires fix is not run with ControlNet; leave enable_hr false or the ControlNet units off"]}})
    if refiner is not None:
        abort(422, errors={"json": {"refiner_checkpoint": [
            "the refiner pass is not run with ControlNet; leave refiner_checkpoint out or the ControlNet units off"]}})
    return plan_controlnet(svc, units, model, task_id, has_init=mode == "img2img")


def chosen_refiner(svc: Services, data: dict) -> ModelInfo | None:
    """refiner_checkpoint, by any name A1111 accepts; "None" or empty: no refiner pass (A1111's UI sends "None")."""
    wanted = data.get("refiner_checkpoint")
    switch = data.get("refiner_switch_at")
    if not wanted or str(wanted).strip().lower() == "none" or switch is not None and switch >= 1:
        return None     # A1111 runs no refiner pass when the switch is at the end
    if switch is not None and switch <= 0:
        abort(422, errors={"json": {"refiner_switch_at": [f"{switch} leaves the model no step; use 0.01..0.99"]}})
    refiner = find_checkpoint(svc, str(wanted))
    if refiner is None:
        abort(422, errors={"json": {"refiner_checkpoint": [f"model {wanted!r} not found; see GET /sdapi/v1/sd-models"]}})
    if not current_key().may_use_model(refiner.name):
        abort(403, message=f"this API key may not use model '{refiner.name}'")
    return refiner


def echo_parameters(data: dict) -> dict:
    """`parameters`: the request with defaults, images left out as A1111 does (unless include_init_images)."""
    echo = dict(data)
    keep = echo.get("include_init_images")
    for name in ("init_images", "mask", "firstpass_image"):
        if name in echo:
            echo[name] = echoed_image(echo[name]) if keep else None
    return echo


def echoed_image(value: Any) -> Any:
    """An image field as `parameters` shows it with include_init_images: base64 again (text stays as sent)."""
    if isinstance(value, list):
        return [echoed_image(v) for v in value]
    return base64.b64encode(value.data).decode() if hasattr(value, "data") else value


def build_info(svc: Services, spec: JobSpec, task: Task, data: dict, warnings: list[str]) -> dict:
    """A1111's Processed.js() for a finished task, plus sdqueue's task_id and warnings."""
    model = svc.catalog.model(spec.model)
    seeds = task.seeds or spec.seeds
    subseed = data["subseed"] if data.get("subseed") not in (None, -1) else spec.seed
    return {
        **generation_info(spec, seeds), "subseed": subseed,
        "all_subseeds": [(subseed + i) % 2**32 for i in range(len(seeds))],
        "subseed_strength": data.get("subseed_strength") or 0, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_stem(model) if model else spec.model,
        "sd_model_hash": model_sha256(model)[:10] if model else None, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "extra_generation_params": extra_generation_params(spec),
        "index_of_first_image": 0, "styles": data.get("styles") or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(task.started_at or task.created_at)),
        "clip_skip": 1, "is_using_inpainting_conditioning": False,
        "task_id": task.id, "interrupted": task.status is TaskStatus.CANCELLED, "warnings": warnings,
    }


def extra_generation_params(spec: JobSpec) -> dict:
    """A1111's extra_generation_params: the infotext's entries beyond the fixed ones (schedule type, refiner,
    the hires fix's)."""
    extra: dict[str, Any] = {}
    schedule = next((label for option, label in SCHEDULE_LABELS if spec.scheduler_config.get(option)), None)
    if schedule:
        extra["Schedule type"] = schedule
    if spec.refiner:
        extra.update({"Refiner": spec.refiner, "Refiner switch at": spec.refiner_switch})
    if spec.hires:
        extra.update(hires_params(spec))
    return extra


def progress_of(svc: Services, task: Task | None, skip_current_image: bool = False) -> dict:
    """GET /progress for the caller's current job, with A1111's formula for progress and ETA; current_image is
    the job's newest live preview (base64 without a data: prefix, as the web UI sends it)."""
    idle = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
            "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if task is None or task.status.terminal:
        if task is not None:
            idle["interrupted"] = task.status is TaskStatus.CANCELLED
        return {"progress": 0.0, "eta_relative": 0.0, "state": idle, "current_image": None, "textinfo": None}
    total = task.progress_total or task.spec.num_inference_steps
    fraction = task.progress_step / total if total else 0.0
    started = task.started_at or task.created_at
    elapsed = max(0.0, time.time() - started)
    progress = min(1.0, 0.01 + fraction)
    eta = elapsed / progress - elapsed if task.status is TaskStatus.PROCESSING else 0.0
    state = {**idle, "job": f"scripts_{'img2img' if task.spec.init_image_key else 'txt2img'}", "job_count": 1,
             "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
             "sampling_step": task.progress_step, "sampling_steps": total, "interrupted": task.cancel_requested}
    preview = None if skip_current_image or task.status is not TaskStatus.PROCESSING else svc.store.preview(task.id)
    return {"progress": round(progress if task.status is TaskStatus.PROCESSING else 0.0, 4),
            "eta_relative": round(eta, 3), "state": state,
            "current_image": preview.image.partition(",")[2] if preview else None,
            "textinfo": "waiting in queue" if task.status is TaskStatus.PENDING else None}


def png_info(text: str) -> dict:
    """POST /png-info: the parameters chunk, other text chunks, and the parsed infotext."""
    from api.init_image import InitImageError, decode_init_image

    try:
        image = decode_init_image(text)
    except InitImageError as exc:
        abort(422, errors={"json": {"image": [str(exc)]}})
    with Image.open(io.BytesIO(image.data)) as img:
        chunks = {k: v for k, v in (img.info or {}).items() if isinstance(v, str)}
    info = chunks.pop("parameters", "")
    parsed: dict[str, Any] = {}
    if info:
        fields = parse_infotext(info)
        parsed = {"Prompt": fields.pop("prompt", ""), "Negative prompt": fields.pop("negative_prompt", "")}
        for key, value in fields.items():
            if key == "Size" and "x" in value:
                parsed["Size-1"], parsed["Size-2"] = value.split("x", 1)
            else:
                parsed[key] = value
    return {"info": info, "items": chunks, "parameters": parsed}
