"""FLUX.1 (dev and schnell): 1024 px, CLIP + T5, a rectified-flow transformer, distilled guidance.

Why its own module: Flux has no unconditional pass (its guidance is an
embedding, and schnell's is none), so it takes no negative prompt (the API
refuses one with a 422); it runs flow-matching schedulers only, wants
bfloat16 on CUDA, and its img2img pipeline makes 1024² unless told the size.
"""
from __future__ import annotations

from typing import Any

from common.jobspec import JobSpec
from worker.pipelines.base import TransformerFamily


class Flux(TransformerFamily):
    """FLUX.1: guidance_scale is the distilled guidance (dev ~3.5, schnell ignores it); sides multiples of 16."""

    name = "flux"
    families = ("flux",)
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    transformer_class = "FluxTransformer2DModel"

    def negative_kwargs(self, spec: JobSpec) -> dict[str, Any]:
        """None: the API refuses a negative prompt for Flux, so there is none to pass."""
        return {}

    def image_size_kwargs(self, spec: JobSpec) -> dict[str, Any]:
        """The init image's (rounded) size, not the pipeline's default 1024²."""
        return {"width": spec.width, "height": spec.height}


FAMILY = Flux()
