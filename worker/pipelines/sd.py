"""Stable Diffusion 1.x and 2.x: 512/768 px, one CLIP (or OpenCLIP) text encoder, beta schedules.

Why its own module: the family seam (base.DiffusersFamily) does what every
family does; this says what SD 1.x/2.x are: their classes, their single-file
class, and that their folders may carry a safety checker sdqueue never runs.
"""
from __future__ import annotations

from typing import Any

from worker.pipelines.base import DiffusersFamily


class StableDiffusion(DiffusersFamily):
    """SD 1.x/2.x: classifier-free guidance with a negative prompt; UNet; fp16 on CUDA."""

    name = "sd"
    families = ("sd1", "sd2")
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
    single_file_class = "StableDiffusionPipeline"
    clip_encoders = (("", "tokenizer", "text_encoder"),)   # CLIP-L (1.x) or OpenCLIP-H (2.x), its last layer

    def load_options(self) -> dict[str, Any]:
        """No safety checker: sdqueue serves images as generated (operators filter downstream if they must)."""
        return {"safety_checker": None, "requires_safety_checker": False}


FAMILY = StableDiffusion()
