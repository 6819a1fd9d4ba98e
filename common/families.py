"""Model families as the API sees them: detection from files, native sizes, defaults, what applies.

Why in common (no torch): the API must default and validate a request for
the model it names (a Flux size must be a multiple of 16, a beta-schedule
scheduler does not apply to a flow-matching model) before queueing, reading
only the model's files. How a family loads and runs is the worker's business
(worker/pipelines/<family>.py, which reads its profile from here).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

BETA, FLOW = "beta", "flow"   # noise schedules: DDPM-style betas (SD 1.x/2.x/SDXL) or flow matching (SD3, Flux)


@dataclass(frozen=True)
class Profile:
    """What one family defaults to and accepts."""

    name: str                 # sd1, sd2, sdxl, sdxl-refiner, sd3, flux
    label: str
    native_size: int          # pixels a side when the model's files do not say
    size_multiple: int        # width and height must be multiples of this
    steps: int
    guidance: float
    strength: float
    schedule: str             # BETA or FLOW: which schedulers apply
    negative_prompt: bool     # whether a negative prompt means anything to it
    cuda_dtype: str           # what worker.dtype auto means on CUDA
    txt2img: bool = True      # False: only usable as a refiner (img2img of another model's latents)
    # Non-empty: the only schedulers its pipeline can drive (Flux passes its own sigmas, which Heun cannot take).
    only_schedulers: tuple[str, ...] = ()
    inpaint: bool = True      # diffusers has an inpainting pipeline for it (every family served today)


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("sd1", "Stable Diffusion 1.x", 512, 8, 30, 7.5, 0.75, BETA, True, "float16"),
    Profile("sd2", "Stable Diffusion 2.x", 768, 8, 30, 7.5, 0.75, BETA, True, "float16"),
    Profile("sdxl", "Stable Diffusion XL", 1024, 8, 30, 7.0, 0.75, BETA, True, "float16"),
    Profile("sdxl-refiner", "Stable Diffusion XL refiner", 1024, 8, 30, 7.0, 0.3, BETA, True, "float16",
            txt2img=False),
    Profile("sd3", "Stable Diffusion 3.x", 1024, 16, 28, 7.0, 0.6, FLOW, True, "bfloat16"),
    Profile("flux", "FLUX.1", 1024, 16, 28, 3.5, 0.8, FLOW, False, "bfloat16",
            only_schedulers=("FlowMatchEulerDiscreteScheduler",)),
)}

# model_index.json `_class_name` -> family (sd1 may become sd2, sdxl may be a refiner: see detect_folder_family).
PIPELINE_FAMILIES: dict[str, str] = {
    "StableDiffusionPipeline": "sd1", "StableDiffusionImg2ImgPipeline": "sd1", "StableDiffusionInpaintPipeline": "sd1",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3", "StableDiffusion3Img2ImgPipeline": "sd3", "StableDiffusion3InpaintPipeline": "sd3",
    "FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux", "FluxInpaintPipeline": "flux",
}
OPENCLIP_WIDTH = 1024   # SD 2.x's text encoder (OpenCLIP ViT-H) is 1024 wide; SD 1.x's CLIP ViT-L is 768


@dataclass(frozen=True)
class ModelDefaults:
    """A request's values when it names none, for one model (family defaults < models.overrides)."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    strength: float
    scheduler: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "steps": self.steps,
                "guidance_scale": self.guidance_scale, "strength": self.strength, "scheduler": self.scheduler}


OVERRIDABLE = ("width", "height", "steps", "guidance_scale", "strength", "scheduler")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON config, or {} when missing or unreadable (a half-copied folder must not break a listing)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def detect_folder_family(folder: Path) -> str | None:
    """The family of a diffusers folder, from model_index.json's pipeline class (and the text encoder's width)."""
    index = read_json(folder / "model_index.json")
    family = PIPELINE_FAMILIES.get(str(index.get("_class_name", "")))
    if family == "sd1":
        text = read_json(folder / "text_encoder" / "config.json")
        if text.get("hidden_size") == OPENCLIP_WIDTH:
            return "sd2"
    if family == "sdxl":
        encoder = index.get("text_encoder")
        if not encoder or encoder == [None, None]:
            return "sdxl-refiner"
    return family


def folder_native_size(vae: Mapping[str, Any], denoiser: Mapping[str, Any], family: str) -> int:
    """Native pixels a side from a folder's VAE and denoiser (UNet or transformer) configs: the denoiser's
    sample size times the VAE's downscale, as the pipelines compute it.

    Flux's pipeline fixes its default sample size at 128 latents (1024 px);
    the others read the UNet's or transformer's `sample_size`.
    """
    blocks = vae.get("block_out_channels")
    scale = 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else 8
    if family == "flux":
        return 128 * scale
    sample = denoiser.get("sample_size")
    if isinstance(sample, (list, tuple)):
        sample = sample[0]
    return int(sample) * scale if isinstance(sample, int) and sample > 0 else PROFILES[family].native_size


def folder_variant_defaults(transformer: Mapping[str, Any], family: str) -> dict[str, Any]:
    """Defaults a variant of a family ships with, read from its transformer config.

    FLUX.1 [schnell] (no guidance embedding) is timestep-distilled: 4 steps,
    no guidance. SD 3.5 (query-key RMS norm) is tuned for lower guidance
    than SD3 Medium.
    """
    if family == "flux" and transformer and not transformer.get("guidance_embeds", True):
        return dict(SCHNELL_DEFAULTS)
    if family == "sd3" and transformer.get("qk_norm"):
        return dict(SD35_DEFAULTS)
    return {}


SCHNELL_DEFAULTS = {"steps": 4, "guidance_scale": 0.0}   # FLUX.1 [schnell]: timestep-distilled, no guidance
SD35_DEFAULTS = {"guidance_scale": 4.5}                  # SD 3.5: tuned for lower guidance than SD3 Medium


def model_defaults(family: str, native_size: int, variant: Mapping[str, Any],
                   override: Mapping[str, Any] | None) -> ModelDefaults:
    """Family defaults, then the variant's, then the operator's models.overrides entry for this model."""
    profile = PROFILES[family]
    values: dict[str, Any] = {"width": native_size, "height": native_size, "steps": profile.steps,
                              "guidance_scale": profile.guidance, "strength": profile.strength, "scheduler": None}
    values.update(variant)
    values.update({k: v for k, v in (override or {}).items() if k in OVERRIDABLE and v is not None})
    return ModelDefaults(**values)


def check_overrides(overrides: Any, max_size: int, max_steps: int) -> None:
    """ValueError naming the first models.overrides entry that cannot be a model's defaults.

    Why at start: a typo here would otherwise surface as a 500 on every
    listing, or as jobs the worker fails long after they were accepted.
    """
    from common.schedulers import SCHEDULERS

    if not isinstance(overrides, dict):
        raise ValueError("models.overrides: expected a mapping of model name -> defaults")
    for model, entry in overrides.items():
        where = f"models.overrides[{model!r}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping like {{steps: 20, guidance_scale: 5.0}}")
        for key, value in entry.items():
            if key not in (*OVERRIDABLE, "family"):
                raise ValueError(f"{where}.{key}: unknown; one of {', '.join((*OVERRIDABLE, 'family'))}")
            problem = _override_value_problem(key, value, max_size, max_steps, SCHEDULERS)
            if problem:
                raise ValueError(f"{where}.{key}: {problem}")


def _override_value_problem(key: str, value: Any, max_size: int, max_steps: int, schedulers: Any) -> str | None:
    def number(low: float, high: float, integral: bool) -> str | None:
        kinds = (int,) if integral else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            return f"{value!r} is not {'an integer' if integral else 'a number'} in {low:g}..{high:g}"
        return None

    if key in ("width", "height"):
        return number(8, max_size, True) or (f"{value} is not a multiple of 8" if value % 8 else None)
    if key == "steps":
        return number(1, max_steps, True)
    if key == "guidance_scale":
        return number(0, 50, False)
    if key == "strength":
        return number(0, 1, False)
    if key == "scheduler":
        return None if value is None or isinstance(value, str) and value in schedulers \
            else f"{value!r} is not a scheduler name"
    return None if isinstance(value, str) and value in PROFILES else f"{value!r} is not one of {', '.join(PROFILES)}"


def override_fit_problem(profile: Profile, override: Mapping[str, Any] | None) -> str | None:
    """Why an operator's override cannot apply to a model of this family (a Flux width not a multiple of 16,
    a DDIM default for SD3), or None. The model is then listed with this problem, not served."""
    from common.schedulers import schedule_of

    override = override or {}
    for name in ("width", "height"):
        value = override.get(name)
        if value is not None and size_problem(profile, name, value):
            return f"models.overrides: {size_problem(profile, name, value)}"
    scheduler = override.get("scheduler")
    if scheduler:
        problem = schedule_problem(profile, scheduler, schedule_of(scheduler), f"scheduler '{scheduler}'")
        if problem:
            return f"models.overrides: {problem}"
    return None


def size_problem(profile: Profile, name: str, value: int) -> str | None:
    """Why `value` pixels cannot be a side for this family, or None."""
    if value % profile.size_multiple:
        return (f"{name} {value} is not a multiple of {profile.size_multiple}, "
                f"which {profile.label} models need")
    return None


def schedule_problem(profile: Profile, scheduler: str, scheduler_schedule: str, label: str) -> str | None:
    """Why `scheduler` (of `scheduler_schedule`, BETA or FLOW) cannot run a model of this family, or None."""
    if scheduler_schedule != profile.schedule:
        kind = "flow-matching" if profile.schedule == FLOW else "beta-schedule (DDPM-style)"
        return f"{label} does not apply to {profile.label} models, which need a {kind} scheduler"
    if profile.only_schedulers and scheduler not in profile.only_schedulers:
        return f"{label} does not apply to {profile.label} models; use {', '.join(profile.only_schedulers)}"
    return None


def with_override_family(family: str | None, override: Mapping[str, Any] | None) -> str | None:
    """models.overrides[model].family wins over detection (for files detection cannot read, e.g. .ckpt)."""
    forced = (override or {}).get("family")
    return forced if isinstance(forced, str) and forced in PROFILES else family


__all__ = ["BETA", "FLOW", "PROFILES", "Profile", "ModelDefaults", "detect_folder_family", "folder_native_size",
           "folder_variant_defaults", "model_defaults", "size_problem", "schedule_problem"]
