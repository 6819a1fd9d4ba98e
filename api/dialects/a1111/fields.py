"""Every generation field of the AUTOMATIC1111 API, classified once: honoured, harmless or unsupported.

Why one table: a field sdqueue accepts but does not run must never change
the picture silently. Each field of the web UI's txt2img / img2img request
models is listed here with what sdqueue does with it. An unsupported field
(or a value of a field sdqueue honours only in part) names the values that
leave the image as sdqueue makes it: false, 0, empty, the web UI's default,
what clients send without thinking. Any other value is refused with a 422
naming the field or, for a lenient key (api.lenient), accepted and named in
info.warnings. SD on EKS and the AWS SD extension carry the same fields and
are screened by the same table; tests/test_fields.py proves that every field
of the web UI's models is in it.

`refusals(data, mode)` is a pure function of a validated request (ControlNet
units are judged by api/dialects/a1111/controlnet.py); translate.screen_fields
decides between a 422 and warnings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping

from api.dialects.a1111.controlnet import unit_refusals
from common.samplers import find_sampler

# The request models of AUTOMATIC1111's stable-diffusion-webui v1.10 (its API's last shape):
# modules/api/models.py builds StableDiffusionTxt2ImgProcessingAPI / StableDiffusionImg2ImgProcessingAPI from
# the __init__ parameters of StableDiffusionProcessingTxt2Img / ...Img2Img (modules/processing.py), less
# API_NOT_ALLOWED, plus its additional fields (sampler_index, script_name, script_args, send_images,
# save_images, alwayson_scripts, force_task_id, infotext; img2img adds init_images, mask, include_init_images).
UPSTREAM_COMMON = (
    "prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
    "seed_resize_from_w", "sampler_name", "scheduler", "batch_size", "n_iter", "steps", "cfg_scale", "width",
    "height", "restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid", "eta", "denoising_strength",
    "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise", "override_settings",
    "override_settings_restore_afterwards", "refiner_checkpoint", "refiner_switch_at", "disable_extra_networks",
    "firstpass_image", "comments", "force_task_id", "sampler_index", "script_name", "script_args", "send_images",
    "save_images", "alwayson_scripts", "infotext",
)
UPSTREAM_TXT2IMG = UPSTREAM_COMMON + (
    "enable_hr", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
    "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
    "hr_negative_prompt",
)
UPSTREAM_IMG2IMG = UPSTREAM_COMMON + (
    "init_images", "resize_mode", "image_cfg_scale", "mask", "mask_blur_x", "mask_blur_y", "mask_blur",
    "mask_round", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
    "initial_noise_multiplier", "latent_mask", "include_init_images",
)


class Treatment(str, Enum):
    HONOURED = "honoured"         # runs as the web UI runs it (a rule may still refuse some values)
    HARMLESS = "harmless"         # never changes the image: saving, echoing, bookkeeping
    UNSUPPORTED = "unsupported"   # refused unless its value leaves the image unchanged (or the key is lenient)


Accepts = Callable[[Any, Mapping[str, Any]], bool]   # (value, whole request) -> whether sdqueue runs it faithfully


def anything(value: Any, data: Mapping[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class FieldRule:
    """What sdqueue does with one field, and which of its values it runs faithfully."""

    treatment: Treatment
    note: str                     # for the docs, the 422 and the warning
    accepts: Accepts = anything
    example: Any = None           # a value that is refused (tests and docs; "<image>" stands for an image)
    pending: str = ""             # the work that will honour it (hires fix, ControlNet), when planned
    entries: Callable[[Mapping[str, Any]], dict[str, str]] | None = None   # a dict field: refused key -> why
    context: Mapping[str, Any] = field(default_factory=dict)   # other fields `example` needs to take effect


def one_of(*values: Any) -> Accepts:
    """Accepts exactly these values (None included where listed)."""
    return lambda value, data: value in values


def unless_on(parent: str, off: tuple, own: tuple = (None,)) -> Accepts:
    """A setting of another feature: inert while `parent` is off (the web UI reads it only then), or at its own
    default."""
    return lambda value, data: data.get(parent) in off or value in own


def honoured(note: str, accepts: Accepts = anything, example: Any = None) -> FieldRule:
    return FieldRule(Treatment.HONOURED, note, accepts, example)


def harmless(note: str) -> FieldRule:
    return FieldRule(Treatment.HARMLESS, note)


ETA_ONE = ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE")


def eta_inert(value: Any, data: Mapping[str, Any]) -> bool:
    """eta as sdqueue runs it: 1 for ancestral and SDE samplers, 0 for DDIM, no effect on the others (the web
    UI reads it for those alone). Clients such as `webuiapi` always send eta=1.0; with no sampler named, the
    two usual defaults pass."""
    if value is None:
        return True
    name = data.get("sampler_name") or data.get("sampler_index")
    found = find_sampler(str(name)) if name else None
    if found is None:
        return value in (0, 1)
    sampler = found[0].name
    if sampler in ETA_ONE:
        return value == 1
    return value == 0 if sampler == "DDIM" else True


def unsupported(note: str, accepts: Accepts, example: Any, pending: str = "", **context: Any) -> FieldRule:
    """`context`: the other fields the example needs to take effect (a hires fix setting needs enable_hr)."""
    return FieldRule(Treatment.UNSUPPORTED, note, accepts, example, pending, context=context)


# --- alwayson_scripts and override_settings: dict fields screened entry by entry ---------------------------
SCRIPT_NOTES: dict[str, str] = {}   # lower-cased script name -> why it is refused when it is on
HONOURED_SCRIPTS = ("controlnet",)   # run: sd-webui-controlnet's units (api/dialects/a1111/controlnet.py)


def script_is_off(value: Any) -> bool:
    """Whether an alwayson_scripts entry leaves the image alone: no args, a first arg of False (the web UI's
    convention: a script's first control is its enable box), or only units with `enabled: false` (ControlNet)."""
    args = value.get("args") if isinstance(value, dict) else value
    if not args:
        return True
    if not isinstance(args, list):
        return False
    if args[0] is False:
        return True
    return all(isinstance(unit, dict) and unit.get("enabled") is False for unit in args)


def script_refusals(data: Mapping[str, Any]) -> dict[str, str]:
    """alwayson_scripts entries that are on, other than ControlNet: sdqueue runs no other web UI scripts (the
    ControlNet units' own settings are screened by controlnet.unit_refusals)."""
    scripts = data.get("alwayson_scripts") or {}
    return {name: SCRIPT_NOTES.get(name.lower(), f"the {name!r} script is not run by sdqueue")
            for name, value in scripts.items() if not script_is_off(value) and name.lower() not in HONOURED_SCRIPTS}


OPTION_RULES: dict[str, FieldRule] = {
    "sd_model_checkpoint": honoured("the model of this request"),
    "CLIP_stop_at_last_layers": unsupported("CLIP skip is not applied", one_of(None, 1), 2),
    "sd_vae": unsupported("every model runs with its own VAE", one_of(None, "", "Automatic", "None"), "other.vae"),
    "sd_unet": unsupported("every model runs with its own denoiser", one_of(None, "", "Automatic", "None"), "x"),
    "sd_lora": unsupported("no LoRA is added to every prompt", one_of(None, "", "None"), "style"),
    "eta_noise_seed_delta": unsupported("the noise seed delta is not applied", one_of(None, 0), 31337),
    "face_restoration": unsupported("no face restoration", one_of(None, False), True),
    "img2img_color_correction": unsupported("no colour correction", one_of(None, False), True),
    "eta_ancestral": unsupported("ancestral samplers run with eta 1", one_of(None, 1), 0.5),
    "eta_ddim": unsupported("DDIM runs with eta 0", one_of(None, 0), 0.5),
    "s_churn": unsupported("no sampler churn", one_of(None, 0), 0.5),
    "s_tmin": unsupported("no sampler churn", one_of(None, 0), 0.5),
    "s_tmax": unsupported("no sampler churn", one_of(None, 0), 0.5),
    "s_noise": unsupported("the sampler noise is not scaled", one_of(None, 1), 0.5),
    "s_min_uncond": unsupported("the negative pass is never skipped", one_of(None, 0), 2.0),
    "initial_noise_multiplier": unsupported("the initial noise is not scaled", one_of(None, 1), 0.5),
    "inpainting_mask_weight": unsupported("inpainting conditioning is fully masked", one_of(None, 1), 0.5),
    "token_merging_ratio": unsupported("no token merging", one_of(None, 0), 0.5),
    "token_merging_ratio_img2img": unsupported("no token merging", one_of(None, 0), 0.5),
    "token_merging_ratio_hr": unsupported("no token merging", one_of(None, 0), 0.5),
    "sdxl_crop_top": unsupported("SDXL crop conditioning is 0", one_of(None, 0), 64),
    "sdxl_crop_left": unsupported("SDXL crop conditioning is 0", one_of(None, 0), 64),
    "tiling": unsupported("no tiling", one_of(None, False), True),
    "img2img_fix_steps": unsupported("img2img runs strength x steps", one_of(None, False), True),
    "always_discard_next_to_last_sigma": unsupported("sigmas are the scheduler's", one_of(None, False), True),
    "k_sched_type": unsupported("schedules follow the sampler and scheduler fields",
                                one_of(None, "", "Automatic"), "karras"),
    "emphasis": unsupported("prompt emphasis is the web UI's original one", one_of(None, "Original"), "None"),
    **{name: harmless("saving, file names and the UI; no effect on the image") for name in (
        "samples_save", "samples_format", "samples_filename_pattern", "save_images_add_number",
        "save_images_replace_action", "grid_save", "grid_format", "grid_extended_filename", "grid_only_if_multiple",
        "n_rows", "enable_pnginfo", "save_txt", "save_images_before_face_restoration",
        "save_images_before_highres_fix", "save_images_before_color_correction", "save_mask", "save_mask_composite",
        "jpeg_quality", "webp_lossless", "export_for_4chan", "img_downscale_threshold", "target_side_length",
        "img_max_size_mp", "use_original_name_batch", "save_selected_only", "save_init_img", "temp_dir",
        "save_incomplete_images", "outdir_samples", "outdir_txt2img_samples", "outdir_img2img_samples",
        "outdir_grids", "outdir_txt2img_grids", "outdir_img2img_grids", "outdir_save", "outdir_init_images",
        "save_to_dirs", "grid_save_to_dirs", "directories_filename_pattern", "directories_max_prompt_words",
        "sd_checkpoint_hash", "sd_checkpoint_cache", "sd_vae_checkpoint_cache", "live_previews_enable",
        "show_progress_every_n_steps", "show_progressbar", "face_restoration_model", "code_former_weight",
        "face_restoration_unload", "upcast_attn", "randn_source")},
}


def option_refusals(data: Mapping[str, Any]) -> dict[str, str]:
    """override_settings entries whose value would change the image: options sdqueue applies are run,
    options with no effect on images pass, any other option is not applied by sdqueue."""
    refused = {}
    for name, value in (data.get("override_settings") or {}).items():
        rule = OPTION_RULES.get(name)
        if rule is None:
            refused[name] = f"option {name!r} is not applied by sdqueue"
        elif not rule.accepts(value, data):
            refused[name] = rule.note
    return refused


# --- the table ------------------------------------------------------------------------------------------
HIRES_OFF = (None, False)
CHURN_OFF = (None, 0)
SCRIPT_OFF = (None, "", "None")
TXT2IMG_FIELD_NOTE = "a txt2img field; img2img ignores it, as the web UI's does"


def inpainting(note: str, runs: tuple, example: Any) -> FieldRule:
    """An inpainting option (read only with a mask) that sdqueue runs for the values `runs`."""
    return FieldRule(Treatment.HONOURED, note, lambda value, data: data.get("mask") is None or value in runs, example,
                     context={"mask": "<image>"})


def hires(note: str, own: tuple = (None,), example: Any = "x") -> FieldRule:
    """A hires fix setting sdqueue does not run (the web UI reads it only with enable_hr)."""
    return unsupported(note, unless_on("enable_hr", HIRES_OFF, own), example, enable_hr=True)


COMMON: dict[str, FieldRule] = {
    "prompt": honoured("the prompt; <lora:name:weight> tags apply LoRAs"),
    "negative_prompt": honoured("the negative prompt"),
    "styles": unsupported("sdqueue has no saved prompt styles", one_of(None, []), ["cinematic"]),
    "seed": honoured("-1: random; image n uses seed + n"),
    "subseed": unsupported("variation seeds are not supported", unless_on("subseed_strength", (None, 0), (None, -1)),
                           7, subseed_strength=0.5),
    "subseed_strength": unsupported("variation seeds are not supported", one_of(None, 0), 0.5),
    "seed_resize_from_h": unsupported("resizing the seed is not supported",
                                      lambda v, d: not (v or 0) > 0 or not (d.get("seed_resize_from_w") or 0) > 0, 256,
                                      seed_resize_from_w=256),
    "seed_resize_from_w": unsupported("resizing the seed is not supported",
                                      lambda v, d: not (v or 0) > 0 or not (d.get("seed_resize_from_h") or 0) > 0, 256,
                                      seed_resize_from_h=256),
    "sampler_name": honoured("as the diffusers scheduler of that A1111 sampler; unknown names fall back as A1111 does"),
    "sampler_index": honoured("the sampler when sampler_name is not given"),
    "scheduler": honoured("the schedule type (Karras, Exponential, ...)"),
    "batch_size": honoured("images per pipeline call"),
    "n_iter": honoured("pipeline calls"),
    "steps": honoured("denoising steps"),
    "cfg_scale": honoured("classifier-free guidance scale"),
    "width": honoured("rounded down to the family's multiple"),
    "height": honoured("rounded down to the family's multiple"),
    "restore_faces": unsupported("face restoration is not run (sdqueue has no face restoration model)",
                                 one_of(None, False), True),
    "tiling": unsupported("tileable images are not supported", one_of(None, False), True),
    "do_not_save_samples": harmless("sdqueue stores copies only with save_images"),
    "do_not_save_grid": harmless("sdqueue makes no grids"),
    "eta": unsupported("eta is not applied (ancestral and SDE samplers run with 1, DDIM with 0, the others "
                       "take none)", eta_inert, 0.5, sampler_name="Euler a"),
    "s_min_uncond": unsupported("the negative pass is never skipped", one_of(None, 0), 2.0),
    "s_churn": unsupported("sampler churn is not supported", one_of(*CHURN_OFF), 0.5),
    "s_tmin": unsupported("sampler churn is not supported", unless_on("s_churn", CHURN_OFF), 0.5, s_churn=0.5),
    "s_tmax": unsupported("sampler churn is not supported", unless_on("s_churn", CHURN_OFF), 10.0, s_churn=0.5),
    "s_noise": unsupported("the sampler noise is not scaled", one_of(None, 1), 0.5),
    "override_settings": FieldRule(Treatment.UNSUPPORTED, "options sdqueue does not apply",
                                   lambda v, d: not option_refusals(d), {"CLIP_stop_at_last_layers": 2},
                                   entries=option_refusals),
    "override_settings_restore_afterwards": harmless("overrides apply to this request only"),
    "refiner_checkpoint": honoured("the SDXL refiner pass"),
    "refiner_switch_at": honoured("where the refiner takes over"),
    "disable_extra_networks": honoured("true: <lora:...> tags are removed from the prompt and not applied"),
    "firstpass_image": hires("a given first-pass image is not supported (the hires fix makes its own)",
                             example="<image>"),
    "comments": harmless("the web UI writes them into its infotext only"),
    "force_task_id": harmless("the web UI's progress id; sdqueue's task id is its own"),
    "script_name": unsupported("web UI scripts are not run by sdqueue", one_of(*SCRIPT_OFF), "x/y/z plot"),
    "script_args": unsupported("web UI scripts are not run by sdqueue",
                               unless_on("script_name", SCRIPT_OFF, (None, [])), [1, 2], script_name="x/y/z plot"),
    "send_images": honoured("false: the answer has no images"),
    "save_images": honoured("copies in the bucket under outputs/txt2img-images/{owner}/"),
    "alwayson_scripts": FieldRule(Treatment.HONOURED, "controlnet: sd-webui-controlnet's units are run (see "
                                  "ControlNet); other web UI scripts are refused unless off",
                                  lambda v, d: not script_refusals(d), {"ADetailer": {"args": [True, {}]}},
                                  entries=script_refusals),
    "infotext": unsupported("parameters are not read from an infotext", one_of(None, ""), "a cat\nSteps: 20"),
}

TXT2IMG: dict[str, FieldRule] = {
    **COMMON,
    "denoising_strength": honoured("the hires fix's second-pass strength (default 0.75 as the web UI for SD 1.x/2.x, "
                                   "the model's img2img strength for the others)"),
    "enable_hr": honoured("the hires fix: the first pass, an upscale, then img2img at the upscaled size, in one job"),
    "firstphase_width": unsupported("the old hires fix's first-pass size is not supported", one_of(None, 0), 256),
    "firstphase_height": unsupported("the old hires fix's first-pass size is not supported", one_of(None, 0), 256),
    "hr_scale": honoured("upscale factor (default 2) when hr_resize_x/y are 0"),
    "hr_upscaler": honoured("a latent mode (GET /latent-upscale-modes; default Latent), a pixel upscaler or an "
                            "ESRGAN-class model (GET /upscalers); unknown names are a 422"),
    "hr_second_pass_steps": honoured("second-pass steps; 0: as many as steps"),
    "hr_resize_x": honoured("hires width (one side alone keeps the aspect ratio; both crop the centre)"),
    "hr_resize_y": honoured("hires height (one side alone keeps the aspect ratio; both crop the centre)"),
    "hr_checkpoint_name": hires("the hires pass runs on the first pass's model",
                                (None, "", "Use same checkpoint")),
    "hr_sampler_name": honoured("the second pass's sampler (\"Use same sampler\": the first pass's)"),
    "hr_scheduler": honoured("the second pass's schedule type (\"Use same scheduler\": the first pass's)"),
    "hr_prompt": honoured("the second pass's prompt (empty: the prompt; LoRA tags are not applied again)"),
    "hr_negative_prompt": honoured("the second pass's negative prompt (empty: the negative prompt)"),
}

IMG2IMG: dict[str, FieldRule] = {
    **COMMON,
    # sdqueue's img2img schema extends its txt2img one; the web UI's img2img has no hires fix and ignores these.
    **{name: harmless(TXT2IMG_FIELD_NOTE)
       for name in TXT2IMG if name not in COMMON},
    "denoising_strength": honoured("img2img strength"),
    "init_images": honoured("only the first init image is used; a batch of several is not supported",
                            lambda v, d: len(v or []) <= 1, ["<image>", "<image>"]),
    "resize_mode": honoured("0 (just resize) is run; crop and resize, resize and fill and latent upscale are not "
                            "supported", one_of(None, 0), 1),
    "image_cfg_scale": harmless("only instruct-pix2pix models read it; sdqueue serves none"),
    "mask": honoured("inpainting: white is repainted"),
    "mask_blur_x": honoured("horizontal mask blur"),
    "mask_blur_y": honoured("vertical mask blur"),
    "mask_blur": honoured("mask blur (sets mask_blur_x and mask_blur_y)"),
    "mask_round": inpainting("true: the latent mask is rounded (diffusers' inpainting binarises it); false is not "
                             "supported", (None, True), False),
    "inpainting_fill": inpainting("masked content: 0 (fill) and 1 (original) are run; the latent fills (2, 3) are "
                                  "not supported", (None, 0, 1), 2),
    "inpaint_full_res": honoured("true (the web UI's default): only the region around the mask is repainted, at "
                                 "full size, and pasted back (the output has the init image's size); false: the "
                                 "whole picture"),
    "inpaint_full_res_padding": honoured("pixels around the mask in that region"),
    "inpainting_mask_invert": honoured("1: the black part of the mask is repainted"),
    "initial_noise_multiplier": unsupported("the initial noise is not scaled", one_of(None, 1), 0.5),
    "latent_mask": unsupported("a separate latent mask is not supported", one_of(None, ""), "<image>"),
    "include_init_images": honoured("the init images are echoed in parameters"),
}

RULES = {"txt2img": TXT2IMG, "img2img": IMG2IMG}


@dataclass(frozen=True)
class Refusal:
    """A field (or one entry of a dict field) whose value sdqueue would not run as asked."""

    path: tuple[str, ...]
    note: str

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def message(self) -> str:
        return f"{self.note}; this value would change the image (leave it out or at its default)"

    @property
    def warning(self) -> str:
        return f"{self.name}: {self.note} (accepted for a lenient key)"


def refusals(data: Mapping[str, Any], mode: str) -> list[Refusal]:
    """The fields of a validated request (`mode`: txt2img or img2img) whose values sdqueue would not run."""
    found = []
    for name, rule in RULES[mode].items():
        if name not in data or rule.accepts(data[name], data):
            continue
        if rule.entries is not None:
            found += [Refusal((name, key), why) for key, why in rule.entries(data).items()]
        else:
            found.append(Refusal((name,), rule.note))
    return found + [Refusal(path, note) for path, note in unit_refusals(data)]


def nested_errors(found: list[Refusal]) -> dict[str, Any]:
    """Refusals as marshmallow-style messages ({field: [msg]} or {field: {entry: [msg]}}), for abort(422)."""
    errors: dict[str, Any] = {}
    for refusal in found:
        node = errors
        for part in refusal.path[:-1]:
            node = node.setdefault(part, {})
        node.setdefault(refusal.path[-1], []).append(refusal.message)
    return errors


# --- the documentation's table ------------------------------------------------------------------------------
SHOWN = {Treatment.HONOURED: "honoured", Treatment.HARMLESS: "harmless", Treatment.UNSUPPORTED: "refused"}


def markdown_rows() -> list[str]:
    """docs/compat/a1111.md's table of fields, made from this table (tests/test_fields.py checks that the page
    holds these rows, and prints them when it does not)."""
    import json

    rows = ["| field | in | treatment | what sdqueue does | refused, e.g. |", "|---|---|---|---|---|"]
    for name in dict.fromkeys([*TXT2IMG, *IMG2IMG]):
        both = TXT2IMG.get(name) == IMG2IMG.get(name)
        for mode, rule in (("both", TXT2IMG[name]),) if both else (("txt2img", TXT2IMG.get(name)),
                                                                    ("img2img", IMG2IMG.get(name))):
            if rule is None or rule.note == TXT2IMG_FIELD_NOTE:
                continue
            shown = SHOWN[rule.treatment] + (f" (until {rule.pending})" if rule.pending else "")
            example = "" if rule.example is None else f"`{json.dumps(rule.example)}`"
            if rule.context:
                example += " with " + ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in rule.context.items())
            rows.append(f"| `{name}` | {mode} | {shown} | {rule.note} | {example} |")
    return rows

