"""Decode and check a client's init image (data URL or bare base64).

Why at the API: a broken or oversized image is the client's mistake and
must be a 422 naming `init_image`, not a failed job discovered on a GPU.
Pillow only; no torch here.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]+)?(;[\w=.-]+)*;base64,", re.IGNORECASE)
ACCEPTED = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp"}   # MPO: phone JPEGs
DEFAULT_MAX_PIXELS = 4096 * 4096   # limits.max_image_pixels' default: 16.7 Mpx, checked from the header alone


class InitImageError(ValueError):
    """The init image cannot be used; the message is for the client."""


@dataclass(frozen=True)
class InitImage:
    """Raw bytes as uploaded, their format and size."""

    data: bytes
    format: str
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return f"image/{self.format}"


def decode_init_image(value: str) -> InitImage:
    """`data:image/png;base64,...` (or bare base64) -> InitImage, else InitImageError."""
    match = _DATA_URL.match(value)
    if match:
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise InitImageError(f"data URL must hold an image, got {mime}")
        payload = value[match.end():]
    elif value.startswith("data:"):
        raise InitImageError("data URL must be base64-encoded (data:image/png;base64,...)")
    else:
        payload = value
    try:
        raw = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InitImageError("not valid base64") from exc
    return image_from_bytes(raw)


def pixel_cap() -> int:
    """limits.max_image_pixels of the serving app; the default outside one (tooling, tests)."""
    from api.services import services

    try:
        return int(services().settings.limits.max_image_pixels)
    except (RuntimeError, AttributeError):
        return DEFAULT_MAX_PIXELS


def image_from_bytes(raw: bytes) -> InitImage:
    """Check raw image bytes (fully decoded once, size bounded) -> InitImage, else InitImageError."""
    if not raw:
        raise InitImageError("image is empty")
    most = pixel_cap()
    try:
        with Image.open(io.BytesIO(raw)) as image:     # reads the header only: the size is known before decoding
            fmt, (width, height) = image.format, image.size
            too_large = width * height > most
            if fmt in ACCEPTED and not too_large:
                image.load()   # a full decode: a truncated file is refused here, not on a GPU
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InitImageError("not a readable PNG, JPEG or WebP image") from exc
    if too_large:
        raise InitImageError(f"image is too large ({width}x{height} is over {most} pixels, limits.max_image_pixels)")
    if fmt not in ACCEPTED:
        raise InitImageError(f"unsupported image format {fmt}; use PNG, JPEG or WebP")
    return InitImage(raw, ACCEPTED[fmt], width, height)
