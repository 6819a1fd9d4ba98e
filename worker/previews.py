"""Previews of a job while it denoises: the current latents as a small picture, cheaply.

Why a fixed projection: decoding with the job's VAE at every preview would
cost about as much as a step. Each family's latent channels map almost
linearly to RGB, so a 3-row matrix (the coefficients ComfyUI and the
AUTOMATIC1111 web UI use for their cheap previews) gives a recognisable
image for the price of one small matrix product and a copy of a few KB.
When a TAESD decoder folder is present (models/taesd/<taesd|taesdxl|taesd3|
taef1>, diffusers' AutoencoderTiny), it is used instead: sharper, still cheap.
The step callback only makes the small RGB array; encoding it and writing it
to Redis happen on worker/watch.py's thread.
"""
from __future__ import annotations

import base64
import io
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.store import Preview

log = logging.getLogger("sdqueue.worker")

# Latent -> RGB coefficients per family (rows: latent channels; columns: R, G, B) and their bias.
SD1_FACTORS = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
               (-0.2120, -0.2616, -0.7177))
SDXL_FACTORS = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                (-0.3165, -0.2492, -0.2188))
SDXL_BIAS = (0.1084, -0.0175, -0.0011)
SD3_FACTORS = ((-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458),
               (0.0856, 0.0339, 0.0902), (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309),
               (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358), (-0.0194, 0.0020, 0.0669),
               (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
               (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293),
               (-0.1448, -0.1463, -0.1189))
SD3_BIAS = (0.2394, 0.2135, 0.1925)
FLUX_FACTORS = ((-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433),
                (-0.0174, 0.0160, 0.0617), (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115),
                (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259), (-0.0245, 0.0250, 0.1180),
                (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
                (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
                (-0.1262, -0.0982, -0.0778))
FLUX_BIAS = (-0.0329, -0.0718, -0.0851)
PROJECTIONS: dict[str, tuple[tuple, tuple]] = {
    "sd1": (SD1_FACTORS, (0.0, 0.0, 0.0)), "sd2": (SD1_FACTORS, (0.0, 0.0, 0.0)),
    "sdxl": (SDXL_FACTORS, SDXL_BIAS), "sdxl-refiner": (SDXL_FACTORS, SDXL_BIAS), "sd3": (SD3_FACTORS, SD3_BIAS),
    "flux": (FLUX_FACTORS, FLUX_BIAS),
}
TAESD_FOLDERS = {"sd1": "taesd", "sd2": "taesd", "sdxl": "taesdxl", "sdxl-refiner": "taesdxl", "sd3": "taesd3",
                 "flux": "taef1"}
FORMATS = {"jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
QUALITY = 70


def family_of(pipe: Any) -> str:
    """The family of a pipeline (or a view of it: img2img, inpaint, ControlNet) from its class name: for a job
    whose spec does not say (JobSpec.family is None)."""
    name = type(pipe).__name__
    if "Flux" in name:
        return "flux"
    if "StableDiffusion3" in name:
        return "sd3"
    return "sdxl" if "XL" in name else "sd1"


def preview_interval(requested: int, steps: int, max_previews: int) -> int:
    """Steps between previews: the request's, widened so that one job makes at most `max_previews`."""
    if requested <= 0:
        return 0
    return max(requested, math.ceil(steps / max(1, max_previews)))


def unpack_flux(pipe: Any, latents: Any, width: int, height: int) -> Any:
    """Flux's packed latents (batch, patches, 64) back to (batch, 16, h, w), as its VAE decode does."""
    if latents.ndim == 3 and hasattr(pipe, "_unpack_latents"):
        return pipe._unpack_latents(latents, height, width, getattr(pipe, "vae_scale_factor", 8))
    return latents


def project(latents: Any, family: str) -> np.ndarray:
    """One latent image (channels, h, w) as an RGB uint8 array (h, w, 3), by the family's linear map.

    A latent with another channel count (a tiny test model, an unknown
    architecture) shows its first three channels, normalised.
    """
    import torch

    factors, bias = PROJECTIONS.get(family, PROJECTIONS["sd1"])
    latents = latents.float()
    if latents.shape[0] == len(factors):
        matrix = torch.tensor(factors, device=latents.device)
        rgb = torch.einsum("chw,cr->hwr", latents, matrix) + torch.tensor(bias, device=latents.device)
        rgb = (rgb + 1) / 2
    else:
        rgb = latents[:3].permute(1, 2, 0)
        if rgb.shape[-1] < 3:
            rgb = rgb[..., :1].expand(*rgb.shape[:2], 3)
        low, high = rgb.min(), rgb.max()
        rgb = (rgb - low) / (high - low + 1e-6)
    return (rgb.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()


@dataclass
class RawPreview:
    """What the step callback hands the watcher: the RGB array of a step, encoded later off the step path."""

    step: int
    total: int
    rgb: np.ndarray
    long_side: int            # the job's image's long side: a preview is never larger than the image


def encode_preview(raw: RawPreview, size: int, fmt: str) -> Preview:
    """A RawPreview as a small JPEG/WebP data URL, at most `size` px (and the image's own size) on its long side."""
    image = Image.fromarray(raw.rgb)
    scale = min(size, raw.long_side) / max(image.size)
    if abs(scale - 1) > 1e-3:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BILINEAR)
    kind, mime = FORMATS.get(fmt, FORMATS["jpeg"])
    buffer = io.BytesIO()
    image.save(buffer, kind, quality=QUALITY)
    return Preview(raw.step, raw.total, f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}",
                   image.width, image.height)


class TaesdCache:
    """TAESD decoders of this worker, loaded once per family and device from models/taesd (when present)."""

    def __init__(self, models_dir: Path):
        self.root = Path(models_dir) / "taesd"
        self._loaded: dict[tuple[str, str, str], Any] = {}
        self._missing: set[str] = set()
        self._lock = threading.Lock()

    def decoder(self, family: str, device: Any, dtype: Any) -> Any | None:
        folder = self.root / TAESD_FOLDERS.get(family, "taesd")
        if str(folder) in self._missing or not (folder / "config.json").is_file():
            return None
        key = (str(folder), str(device), str(dtype))
        with self._lock:
            if key not in self._loaded:
                try:
                    from diffusers import AutoencoderTiny

                    self._loaded[key] = AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
                except Exception:  # noqa: BLE001 - a broken folder means cheap previews, never a failed job
                    log.exception("could not load the TAESD decoder in %s; using the cheap projection", folder)
                    self._missing.add(str(folder))
                    return None
            return self._loaded[key]


def decode_taesd(decoder: Any, latents: Any) -> np.ndarray:
    """One latent image through TAESD, as its pipeline would decode it: (h, w, 3) uint8."""
    import torch

    config = decoder.config
    scaled = latents.unsqueeze(0).to(decoder.dtype) / getattr(config, "scaling_factor", 1.0)
    scaled = scaled + (getattr(config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        image = decoder.decode(scaled).sample[0]
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


@dataclass
class Previewer:
    """Makes a job's previews every `every` steps (of the job's own count) from the step callback's latents."""

    every: int
    width: int
    height: int
    taesd: TaesdCache | None = None
    family: str | None = None          # the job's (JobSpec.family); None: read from the pipeline's class

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def render(self, pipe: Any, latents: Any, step: int, total: int) -> RawPreview:
        """The first image of `latents` (the job's slice of the call's batch) as a RawPreview."""
        family = self.family or family_of(pipe)
        latents = unpack_flux(pipe, latents[:1], self.width, self.height)[0].detach()
        decoder = self.taesd.decoder(family, latents.device, latents.dtype) if self.taesd else None
        rgb = decode_taesd(decoder, latents) if decoder is not None else project(latents, family)
        return RawPreview(step, total, rgb, max(self.width, self.height))
