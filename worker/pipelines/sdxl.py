"""Stable Diffusion XL (and its refiner): 1024 px, two text encoders, size and crop conditioning, beta schedules.

Why its own module: SDXL single files need SDXL's class (the SD 1.x class
fails inside the UNet), and the refiner is an img2img-only pipeline that
continues another SDXL model's denoising from a switch point. Original and
target size and crop coordinates keep the diffusers defaults (the output
size, no crop), which is what A1111 sends for an uncropped image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common.catalog import ModelInfo
from worker.pipelines.base import DiffusersFamily


class XLVae(DiffusersFamily):
    """What SDXL and its refiner share: a VAE that diffusers runs in fp32 when it is marked `force_upcast`,
    and CLIP-L + OpenCLIP-bigG conditioning (the refiner has the second only), from their penultimate layers."""

    clip_encoders = (("clip_l", "tokenizer", "text_encoder"), ("clip_g", "tokenizer_2", "text_encoder_2"))
    penultimate = True

    def load(self, model: ModelInfo, device: str, single_file_config: Path | None, dtype: str) -> Any:
        """Load as every family does; in bfloat16, keep the VAE in bfloat16 too.

        Why: SDXL's stock VAE overflows in float16, so diffusers converts it to
        float32 around every encode/decode when its config says force_upcast,
        and back: new storages for the shared VAE on every job. bfloat16 has
        float32's range, so the round trip only costs time there and is turned
        off. In float16 it stays (without it images come out black); a VAE
        fixed for fp16 (force_upcast false in its config) avoids it.
        """
        pipe = super().load(model, device, single_file_config, dtype)
        if dtype == "bfloat16" and getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.register_to_config(force_upcast=False)
        return pipe


class StableDiffusionXL(XLVae):
    """SDXL base models: classifier-free guidance with a negative prompt; fp16 on CUDA."""

    name = "sdxl"
    families = ("sdxl",)
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                        "StableDiffusionXLInpaintPipeline")
    single_file_class = "StableDiffusionXLPipeline"

    def owns(self, pipe) -> bool:
        """An SDXL pipeline with its first text encoder (a refiner has none)."""
        return super().owns(pipe) and getattr(pipe, "text_encoder", None) is not None


class StableDiffusionXLRefiner(XLVae):
    """The SDXL refiner: img2img on the base's latents from `refiner_switch` on (OpenCLIP only, aesthetic score)."""

    name = "sdxl-refiner"
    families = ("sdxl-refiner",)
    pipeline_classes = ("StableDiffusionXLImg2ImgPipeline",)
    single_file_class = "StableDiffusionXLImg2ImgPipeline"


FAMILY = StableDiffusionXL()
REFINER = StableDiffusionXLRefiner()
