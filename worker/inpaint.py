"""What the web UI does around an inpainting pipeline call: the masked content before, the unmasked pixels after.

Why: diffusers' inpainting pipelines repaint the whole latent image and
decode it again, so even the unmasked area comes back changed (by the VAE
round trip at least). The web UI pastes the original pixels back outside
the mask (its "overlay"), optionally starts the masked area from colours
blurred in from around it ("fill"), and with "only masked" repaints just
the region around the mask at full size. The API prepared the mask and the
region (api/inpaint.py); this module does the rest, for every family.
Pillow only.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageFilter, ImageOps

from common.jobspec import JobSpec

FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))   # the web UI's (blur radius, repeats)


@dataclass(frozen=True)
class Overlay:
    """The original pixels to lay over each output, the mask that says where (white: keep the output), and
    the region of the original the output was generated for (None: the whole picture)."""

    original: Image.Image
    mask: Image.Image
    box: tuple[int, int, int, int] | None = None


def inpaint_inputs(spec: JobSpec, init: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image, Overlay]:
    """The pipeline's init image and mask at the job's size, and the overlay for its outputs."""
    size = (spec.width, spec.height)
    init, mask = init.convert("RGB"), mask.convert("L")
    if spec.inpaint_area:
        box = tuple(spec.inpaint_area)
        overlay = Overlay(init, mask, box)
        image, mask = init.crop(box).resize(size, Image.LANCZOS), mask.crop(box).resize(size, Image.LANCZOS)
    else:
        image, mask = init.resize(size), mask.resize(size)
        overlay = Overlay(image, mask.point(lambda v: min(255, v * 2)))   # the web UI's whole-picture overlay
    if spec.inpaint_fill == "fill":
        image = filled(image, mask)
    return image, mask, overlay


def filled(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The masked area painted with colours blurred in from around it (the web UI's masked content "fill")."""
    result = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    for radius, repeats in FILL_PASSES:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(layer)
    return result.convert("RGB")


def paste_back(output: Image.Image, overlay: Overlay) -> Image.Image:
    """The output with the original's unmasked pixels over it (and, for a region, put back in the original)."""
    if overlay.box is not None:
        x1, y1, x2, y2 = overlay.box
        canvas = Image.new("RGBA", overlay.original.size)
        canvas.paste(output.resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
        output = canvas
    kept = Image.new("RGBa", overlay.original.size)
    kept.paste(overlay.original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay.mask))
    result = output.convert("RGBA")
    result.alpha_composite(kept.convert("RGBA"))
    return result.convert("RGB")
