"""Stable Diffusion 3.x: 1024 px, two CLIPs and T5, an MMDiT transformer, flow matching.

Why its own module: SD3 runs flow-matching schedulers only (the API refuses
the others), wants bfloat16 on CUDA, and its img2img pipeline makes its
native size unless told the output size.
"""
from __future__ import annotations

from typing import Any

from common.jobspec import JobSpec
from worker.pipelines.base import TransformerFamily


class StableDiffusion3(TransformerFamily):
    """SD 3 / 3.5: classifier-free guidance with a negative prompt; sides multiples of 16."""

    name = "sd3"
    families = ("sd3",)
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                        "StableDiffusion3InpaintPipeline")
    transformer_class = "SD3Transformer2DModel"

    def image_size_kwargs(self, spec: JobSpec) -> dict[str, Any]:
        """The init image's (rounded) size, not the pipeline's default 1024²."""
        return {"width": spec.width, "height": spec.height}


FAMILY = StableDiffusion3()
