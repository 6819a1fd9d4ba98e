"""Whether a request fits the model it will run on: its family's sizes, schedulers, prompts and modes.

Why one module: every dialect resolves its model first (a field, a key's
option, the default), then asks here, so a Flux size that is not a multiple
of 16 or a DDIM scheduler asked of SD3 is the same 422 naming the dialect's
own field everywhere, before anything is queued.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from flask_smorest import abort

from common.catalog import ModelInfo, lora_problem
from common.families import schedule_problem, size_problem
from common.promptsyntax import A1111, WEIGHTED_FAMILIES
from common.schedulers import schedule_of

# canonical name -> the request field a dialect calls it (a dialect passes its own names)
NATIVE_FIELDS = {"model": "model", "width": "width", "height": "height", "scheduler": "scheduler",
                 "negative_prompt": "negative_prompt", "refiner": "refiner", "mask": "mask_image"}
REFINER_FAMILIES = ("sdxl", "sdxl-refiner")   # what can continue an SDXL model's denoising
DEFAULT_REFINER_SWITCH = 0.8                   # diffusers' and A1111's usual hand-over point


def fit_errors(model: ModelInfo, mode: str, width: int, height: int, scheduler: str | None = None,
               negative_prompt: str | None = None,
               refiner: ModelInfo | None = None, steps: int = 0, refiner_switch: float = DEFAULT_REFINER_SWITCH,
               loras: Sequence[tuple[str, Path]] = (), prompt_syntax: str | None = None,
               names: Mapping[str, str] = NATIVE_FIELDS) -> dict[str, Any]:
    """Field name -> messages for what `model` cannot do with these values ({} when it fits).

    `loras`: (name, file) of each LoRA the request names, in order.
    """
    profile = model.profile
    errors: dict[str, list[str]] = {}

    def add(canonical: str, message: str) -> None:
        errors.setdefault(names.get(canonical, canonical), []).append(message)

    if model.problem:
        add("model", f"model '{model.name}' cannot be served: {model.problem}")
        return errors
    if not profile.txt2img:
        add("model", f"model '{model.name}' is a {profile.label}: it refines another model's images "
                     "(use it as the refiner), it does not start from a prompt")
        return errors
    if mode == "inpaint" and not profile.inpaint:
        add("mask", f"{profile.label} models cannot inpaint here; send no mask, or use another model")
    for name, value in (("width", width), ("height", height)):
        problem = size_problem(profile, name, value)
        if problem:
            add(name, problem)
    if scheduler:
        problem = schedule_problem(profile, scheduler, schedule_of(scheduler), f"scheduler '{scheduler}'")
        if problem:
            add("scheduler", problem)
    if negative_prompt and not profile.negative_prompt:
        add("negative_prompt", f"{profile.label} models take no negative prompt (their guidance is distilled, "
                               "without an unconditional pass); leave it empty")
    if prompt_syntax == A1111 and model.family not in WEIGHTED_FAMILIES:
        add("prompt_syntax", f"A1111's prompt syntax applies to SD 1.x/2.x and SDXL models (their CLIP text "
                             f"encoders); {profile.label} models take the prompt as written: use plain")
    if refiner is not None:
        problem = refiner_problem(model, refiner, mode, steps, refiner_switch)
        if problem:
            add("refiner", problem)
    misfits = {i: {"name": [f"LoRA '{name}' does not fit model '{model.name}': {problem}"]}
               for i, (name, path) in enumerate(loras) if (problem := lora_problem(path, model))}
    if misfits:
        errors[names.get("loras", "loras")] = misfits
    return errors


def refiner_problem(model: ModelInfo, refiner: ModelInfo, mode: str, steps: int = 0,
                    switch: float = DEFAULT_REFINER_SWITCH) -> str | None:
    """Why `refiner` cannot finish `model`'s images, or None: an SDXL pair (same latent space), no
    inpainting, and a step for each pass (the worker checks the exact timesteps, which img2img strength
    also cuts)."""
    if model.family != "sdxl":
        return f"a refiner pass follows an SDXL model; '{model.name}' is {model.profile.label}"
    if refiner.family not in REFINER_FAMILIES or refiner.problem:
        return f"'{refiner.name}' is {refiner.profile.label}, not an SDXL model or refiner"
    if mode == "inpaint":
        return "inpainting runs without a refiner pass"
    if steps and (steps * switch < 1 or steps * (1 - switch) < 1):
        return f"{steps} steps switched at {switch} leave one pass no step: use more steps or move the switch"
    return None


def abort_unless_fits(model: ModelInfo, **values) -> None:
    """A 422 naming every field `model` cannot take; nothing when the request fits."""
    errors = fit_errors(model, **values)
    if errors:
        abort(422, errors={"json": errors})


def image_size(width: int, height: int, model: ModelInfo) -> tuple[int, int]:
    """An init image's size rounded down to the sides `model` accepts (at least one multiple)."""
    step = model.profile.size_multiple
    return max(step, width // step * step), max(step, height // step * step)


def default_scheduler(settings, model: ModelInfo) -> str | None:
    """defaults.scheduler when it can run the model (its schedule, Flux's Euler only); else None (the model's own)."""
    name = settings.defaults.scheduler
    fits = name and schedule_problem(model.profile, name, schedule_of(name), name) is None
    return name if fits else None
