"""Stable Diffusion XL (and its refiner): 1024 px, two text encoders, size and crop conditioning, beta schedules.

Why its own module: SDXL single files need SDXL's class (the SD 1.x class
fails inside the UNet), and the refiner is an img2img-only pipeline that
continues another SDXL model's denoising from a switch point. Original and
target size and crop coordinates keep the diffusers defaults (the output
size, no crop), which is what A1111 sends for an uncropped image.
"""
from __future__ import annotations

from worker.pipelines.base import DiffusersFamily


class StableDiffusionXL(DiffusersFamily):
    """SDXL base models: classifier-free guidance with a negative prompt; fp16 on CUDA."""

    name = "sdxl"
    families = ("sdxl",)
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                        "StableDiffusionXLInpaintPipeline")
    single_file_class = "StableDiffusionXLPipeline"

    def owns(self, pipe) -> bool:
        """An SDXL pipeline with its first text encoder (a refiner has none)."""
        return super().owns(pipe) and getattr(pipe, "text_encoder", None) is not None


class StableDiffusionXLRefiner(DiffusersFamily):
    """The SDXL refiner: img2img on the base's latents from `refiner_switch` on (OpenCLIP only, aesthetic score)."""

    name = "sdxl-refiner"
    families = ("sdxl-refiner",)
    pipeline_classes = ("StableDiffusionXLImg2ImgPipeline",)
    single_file_class = "StableDiffusionXLImg2ImgPipeline"


FAMILY = StableDiffusionXL()
REFINER = StableDiffusionXLRefiner()
