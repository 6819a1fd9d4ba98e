"""The hires fix: a txt2img pass, an upscale, then an img2img pass at the upscaled size, in one job.

Why its own module: it is the web UI's StableDiffusionProcessingTxt2Img
.sample_hr_pass in diffusers terms, and nothing else in generation needs to
know about it. Latent upscalers interpolate the first pass's latents
(torch.nn.functional.interpolate with the web UI's modes) and hand them to
the family's img2img view as they are; pixel upscalers take the decoded
image, resize it (PIL, or an ESRGAN-class model first: worker/esrgan.py)
and let the img2img view encode it again. Both views
share the base's weights (share_weights), so nothing is converted or copied.
Both passes count on one progress scale and one time limit (PassSteps).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from PIL import Image

from common.errors import ModelError
from common.jobspec import JobSpec
from common.upscalers import LATENT_MODES, centre_box, is_builtin, is_latent, list_model_upscalers, resize_pixels
from worker.conditioning import conditioned
from worker.generation import GenerationResult, PassSteps, applied_loras, make_generators, per_image_prompts
from worker.pipelines import family_of
from worker.pipelines.base import effective_strength

LATENT_SCALE = 8   # latents are 1/8 of the image in every family sdqueue serves


@dataclasses.dataclass(frozen=True)
class HiresPlan:
    """JobSpec.hires, read once: the upscaler, the sizes and the second pass's own settings."""

    upscaler: str
    upscale_width: int
    upscale_height: int
    width: int
    height: int
    steps: int
    strength: float
    prompt: str
    negative_prompt: str | None
    scheduler: str | None
    scheduler_config: dict

    @classmethod
    def of(cls, spec: JobSpec) -> "HiresPlan":
        hires = spec.hires or {}
        return cls(upscaler=hires["upscaler"], upscale_width=hires["upscale_width"],
                   upscale_height=hires["upscale_height"], width=hires["width"], height=hires["height"],
                   steps=hires.get("steps") or spec.num_inference_steps, strength=hires["strength"],
                   prompt=hires.get("prompt") or spec.prompt,
                   negative_prompt=hires.get("negative_prompt") or spec.negative_prompt,
                   scheduler=hires.get("scheduler", spec.scheduler),
                   scheduler_config=hires.get("scheduler_config", spec.scheduler_config) or {})

    @property
    def latent(self) -> bool:
        return is_latent(self.upscaler)

    def expected_steps(self) -> int:
        """The second pass's denoising steps (diffusers' img2img runs int(steps * strength) of them)."""
        return max(1, int(self.steps * effective_strength(self.strength, self.steps)))


def generate_hires(base: Any, spec: JobSpec, lora_files: dict[str, Path], on_step: Any,
                   upscaler: Any = None) -> GenerationResult:
    """Run a hires fix job batch by batch: first pass, upscale, second pass; images at the hires size.

    `upscaler`: the warm network of a model upscaler (model_upscaler), None for the others."""
    family = family_of(base)
    plan = HiresPlan.of(spec)
    first = family.make_view(base, spec, family.make_scheduler(base, spec.scheduler, spec.scheduler_config))
    second = family.make_view(base, spec, family.make_scheduler(base, plan.scheduler, plan.scheduler_config),
                              mode="img2img")
    batches = spec.batches
    steps = PassSteps(on_step, (spec.num_inference_steps + plan.expected_steps()) * len(batches))
    kwargs = family.build_call_kwargs(spec, None, None)
    kwargs.update(callback_on_step_end=steps, output_type="latent" if plan.latent else "pil")
    images: list[Image.Image] = []
    with applied_loras(base, spec.loras, lora_files):
        kwargs = conditioned(base, spec, kwargs)     # after the LoRAs: they may adapt the text encoders
        for count in batches:
            seeds = spec.seeds[len(images):len(images) + count]
            output = first(**kwargs, num_images_per_prompt=count, generator=make_generators(seeds))
            upscaled = upscale_latents(first, spec, plan, output.images) if plan.latent else \
                [upscale_image(image, plan, upscaler) for image in output.images]
            images += second_pass(second, family, spec, plan, upscaled, seeds, steps)
    return GenerationResult(images=images, seeds=spec.seeds, scheduler=type(first.scheduler).__name__,
                            strength=plan.strength)


def needs_model_upscaler(spec: JobSpec) -> bool:
    return bool(spec.hires) and not is_builtin(spec.hires["upscaler"])


def model_upscaler(base: Any, spec: JobSpec, folder: Path) -> Any:
    """The warm ESRGAN-class network the job's hr_upscaler names (in the pipeline's dtype, on its device)."""
    from worker.esrgan import warm_network

    found = list_model_upscalers(folder).get(spec.hires["upscaler"])
    if found is None:
        raise ModelError(f"upscaler '{spec.hires['upscaler']}' is not in the upscalers directory")
    return warm_network(base, found.path)


def upscale_image(image: Image.Image, plan: HiresPlan, upscaler: Any = None) -> Image.Image:
    """A pixel upscaler: resize to the upscaled size (a model upscaler: the model until it covers it, then
    Lanczos, as the web UI's resize_image), then keep the centre at the output size."""
    if upscaler is not None:
        from worker.esrgan import upscale_to

        image = upscale_to(upscaler, image, plan.upscale_width, plan.upscale_height)
    else:
        image = resize_pixels(image, plan.upscale_width, plan.upscale_height, plan.upscaler)
    return image.crop(centre_box(*image.size, plan.width, plan.height)) if image.size != (plan.width, plan.height) \
        else image


def upscale_latents(view: Any, spec: JobSpec, plan: HiresPlan, latents: Any) -> Any:
    """A latent upscaler: the first pass's latents interpolated to the upscaled size, centre kept at the output size.

    Interpolated in float32 (bicubic and antialias are not implemented for
    half precision everywhere), then back in the latents' own dtype.
    """
    import torch.nn.functional as F

    latents = spatial_latents(view, spec, latents)
    mode, antialias = LATENT_MODES[plan.upscaler]
    size = (plan.upscale_height // LATENT_SCALE, plan.upscale_width // LATENT_SCALE)
    scaled = F.interpolate(latents.float(), size=size, mode=mode, antialias=antialias).to(latents.dtype)
    left, top, right, bottom = (v // LATENT_SCALE for v in centre_box(plan.upscale_width, plan.upscale_height,
                                                                      plan.width, plan.height))
    return scaled[:, :, top:bottom, left:right]


def spatial_latents(view: Any, spec: JobSpec, latents: Any) -> Any:
    """Latents as (batch, channels, height, width): Flux returns them packed in 2x2 patches."""
    if latents.ndim == 4:
        return latents
    unpack = getattr(type(view), "_unpack_latents", None)
    if unpack is None:
        raise ModelError(f"{type(view).__name__}: cannot read its latents for a latent upscaler; use Lanczos")
    return unpack(latents, spec.height, spec.width, view.vae_scale_factor)


def second_pass(view: Any, family: Any, spec: JobSpec, plan: HiresPlan, images: Any, seeds: list[int],
                on_step: Any) -> list[Image.Image]:
    """img2img at the output size from the upscaled latents or pixels, at the hires strength.

    Why fresh generators with the same seeds: the web UI draws the second
    pass's noise from the image's seed again (rng.ImageRNG), so an image is
    reproduced by its seed alone.
    """
    at_size = dataclasses.replace(spec, width=plan.width, height=plan.height, prompt=plan.prompt,
                                  negative_prompt=plan.negative_prompt)
    prompts = per_image_prompts(view, at_size, {"prompt": plan.prompt, **family.negative_kwargs(at_size)}, len(seeds))
    output = view(**prompts, image=images, num_inference_steps=plan.steps,
                  strength=effective_strength(plan.strength, plan.steps), guidance_scale=spec.guidance_scale,
                  generator=make_generators(seeds), callback_on_step_end=on_step,
                  output_type="pil", **family.image_size_kwargs(at_size))
    return list(output.images)
