"""Inpainting masks as the AUTOMATIC1111 web UI prepares them, for every dialect that inpaints.

Why at the API: the mask is the client's input; inverting, blurring and
sizing it (and, for "only masked", finding the region to repaint) is cheap
Pillow work that belongs before the queue, so the worker gets one ready mask
and the job says where to paste the result back (JobSpec.inpaint_area).
The worker then does what the web UI does around the pipeline call: fills
the masked area if asked, and pastes the unmasked pixels back over the
output (worker/inpaint.py). Pillow only; no torch here.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageFilter, ImageOps

from api.init_image import InitImage

FILLS = ("fill", "original")   # the web UI's masked content 0 and 1 (its latent fills are not supported)


@dataclass(frozen=True)
class InpaintPlan:
    """The mask to upload (PNG), the region of the init image to repaint at full size (None: the whole
    picture) and how the masked area starts (`fill` or `original`)."""

    mask_png: bytes
    area: list[int] | None
    fill: str


def opened(image: InitImage) -> Image.Image:
    """The decoded image (its bytes were checked when the request was validated)."""
    with Image.open(io.BytesIO(image.data)) as raw:
        raw.load()
        return raw.copy()


def binary_mask(image: Image.Image) -> Image.Image:
    """The mask as one channel: an RGBA mask with real transparency is its alpha (thresholded, as the web UI's
    canvas sends masks), anything else its grey level."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        return image.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    return image.convert("L")


def blurred(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """Gaussian blur with its own standard deviation across and down, as the web UI's mask_blur_x/_y."""
    if blur_x <= 0 and blur_y <= 0:
        return mask
    return mask.filter(ImageFilter.GaussianBlur((max(blur_x, 0), max(blur_y, 0))))


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """The box around every masked pixel, grown by `padding` within the image; None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_region(box: tuple[int, int, int, int], width: int, height: int,
                  image_width: int, image_height: int) -> tuple[int, int, int, int]:
    """`box` grown to the aspect ratio of the size it is generated at (width x height), kept inside the
    image, as the web UI's expand_crop_region does: the repainted region is not distorted."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > width / height:
        grow = int((x2 - x1) * height / width - (y2 - y1))
        y1, y2 = shift_inside(y1 - grow // 2, y2 + grow - grow // 2, image_height)
    else:
        grow = int((y2 - y1) * width / height - (x2 - x1))
        x1, x2 = shift_inside(x1 - grow // 2, x2 + grow - grow // 2, image_width)
    return x1, y1, x2, y2


def shift_inside(start: int, end: int, limit: int) -> tuple[int, int]:
    """A span moved back inside 0..limit (and cut to it when longer)."""
    if end > limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def plan_inpaint(mask: InitImage, init: InitImage, width: int, height: int, blur_x: int = 4, blur_y: int = 4,
                 invert: bool = False, only_masked: bool = False, padding: int = 0,
                 fill: str = "original") -> InpaintPlan:
    """The web UI's mask preparation: one channel, inverted if asked, blurred at the init image's size; then
    either resized to the output size (whole picture) or kept at the init image's size with the region around
    the mask to repaint at full size (only masked; an empty mask repaints nothing, as the whole picture)."""
    prepared = binary_mask(opened(mask))
    if prepared.size != (init.width, init.height):
        prepared = prepared.resize((init.width, init.height))
    if invert:
        prepared = ImageOps.invert(prepared)
    prepared = blurred(prepared, blur_x, blur_y)
    box = crop_region(prepared, padding) if only_masked else None
    area = list(expand_region(box, width, height, init.width, init.height)) if box else None
    if area is None:
        prepared = prepared.resize((width, height))
    out = io.BytesIO()
    prepared.save(out, format="PNG")
    return InpaintPlan(out.getvalue(), area, fill)
