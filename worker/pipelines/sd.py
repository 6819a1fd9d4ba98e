"""The Stable Diffusion 1.x/2.x family (and today the catch-all for any folder AutoPipeline loads).

Why one module: everything that would differ for another family lives
here: loading (diffusers folder via AutoPipeline, single file offline via
`from_single_file(config=<local diffusers folder>)`), per-request views and
schedulers, and the pipeline call's arguments.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ModelError
from worker.pipelines.base import effective_strength, share_weights, task_class

if TYPE_CHECKING:
    from PIL import Image

    from common.catalog import ModelInfo
    from common.jobspec import JobSpec


class StableDiffusion:
    """SD 1.x/2.x: 512 px native, classifier-free guidance, one CLIP text encoder."""

    name = "sd"
    # Equal to settings.defaults (the API fills every JobSpec from those) and catalog.DEFAULT_SINGLE_FILE_SIZE.
    default_size = 512
    default_steps = 30
    default_guidance = 7.5
    default_strength = 0.75

    def matches(self, model: ModelInfo) -> bool:
        """Every model: this family is the catch-all, registered last."""
        return True

    def owns(self, pipe: Any) -> bool:
        """Every pipeline: the catch-all, as in `matches`."""
        return True

    def cuda_dtype(self) -> str:
        """float16: SD 1.x/2.x (and SDXL, which this family loads for now) were trained and ship in fp16."""
        return "float16"

    def load(self, model: ModelInfo, device: str, single_file_config: Path | None, dtype: str) -> Any:
        """Load one model onto `device`, its weights in `dtype`."""
        import torch
        from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline

        common = dict(dtype=getattr(torch, dtype), local_files_only=True, safety_checker=None,
                      requires_safety_checker=False)
        if model.kind == "diffusers":
            pipe = AutoPipelineForText2Image.from_pretrained(str(model.path), **common)
        else:
            if single_file_config is None:
                raise FileNotFoundError("a single-file checkpoint needs models.single_file_config "
                                        "(a local diffusers folder)")
            pipe = StableDiffusionPipeline.from_single_file(str(model.path), config=str(single_file_config), **common)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def make_scheduler(self, base: Any, name: str | None, overrides: dict[str, Any] | None = None) -> Any:
        """A fresh scheduler instance: the named diffusers class, or a copy of the model's own.

        `overrides` (e.g. use_karras_sigmas, algorithm_type) turn one class into
        the A1111 sampler variants, as diffusers' scheduler docs map them.
        """
        import diffusers

        cls = getattr(diffusers, name) if name else type(base.scheduler)
        return cls.from_config(base.scheduler.config, **(overrides or {}))

    def make_view(self, base: Any, spec: JobSpec, scheduler: Any) -> Any:
        """A per-request pipeline for the job's mode, on `base`'s very weights, with its own scheduler.

        Why views: a per-request scheduler must never be assigned on the
        shared base, which other requests use; and nothing may convert or
        copy the shared weights (base.share_weights).
        """
        return share_weights(task_class(base, spec.mode), base, scheduler=scheduler)

    def build_call_kwargs(self, spec: JobSpec, init_image: Image.Image | None,
                          mask_image: Image.Image | None) -> dict[str, Any]:
        """Prompt, steps and guidance; width/height for txt2img, the resized image(s) and strength otherwise."""
        kwargs: dict[str, Any] = dict(
            prompt=spec.prompt, negative_prompt=spec.negative_prompt or None,
            num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
        )
        if spec.mode == "txt2img":
            kwargs.update(width=spec.width, height=spec.height)
            return kwargs
        if init_image is None:
            raise ModelError(f"{spec.mode} job without its init image")
        strength = spec.strength if spec.strength is not None else self.default_strength
        kwargs.update(image=init_image.convert("RGB").resize((spec.width, spec.height)),
                      strength=effective_strength(strength, spec.num_inference_steps))
        if spec.mode == "inpaint":
            if mask_image is None:
                raise ModelError("inpaint job without its mask")
            kwargs.update(mask_image=mask_image.convert("L").resize((spec.width, spec.height)),
                          width=spec.width, height=spec.height)
        return kwargs


FAMILY = StableDiffusion()
