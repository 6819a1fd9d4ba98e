"""Encode output images with their generation parameters embedded.

Why: a PNG carries A1111's `parameters` text chunk; JPEG/WebP carry the same
text as EXIF UserComment, as A1111 writes them, so the image alone says how
to reproduce it.
"""
from __future__ import annotations

import io

from PIL import Image
from PIL.PngImagePlugin import PngInfo

CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


def encode_image(image: Image.Image, fmt: str, parameters: str) -> bytes:
    """Bytes of `image` in png/jpg/jpeg/webp with `parameters` embedded."""
    buf = io.BytesIO()
    fmt = fmt.lower()
    if fmt == "png":
        info = PngInfo()
        info.add_text("parameters", parameters)
        image.save(buf, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
        pil_format = "WEBP" if fmt == "webp" else "JPEG"
        image.convert("RGB").save(buf, format=pil_format, quality=95, exif=exif.tobytes())
    return buf.getvalue()


def read_parameters(data: bytes) -> str | None:
    """The embedded parameters text of an encoded image, if any."""
    image = Image.open(io.BytesIO(data))
    if "parameters" in image.info:
        return image.info["parameters"]
    raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(raw, bytes) and raw.startswith(b"UNICODE\0"):
        return raw[8:].decode("utf-16-be")
    return raw if isinstance(raw, str) else None
