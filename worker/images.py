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
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286


PNG_LEVEL = 1   # fast: the images are lossless at every level, and encoding sits between GPU calls


def encode_image(image: Image.Image, fmt: str, parameters: str, png_level: int = PNG_LEVEL) -> bytes:
    """Bytes of `image` in png/jpg/jpeg/webp with `parameters` embedded (PNG at zlib level `png_level`)."""
    buf = io.BytesIO()
    fmt = fmt.lower()
    if fmt == "png":
        info = PngInfo()
        info.add_text("parameters", parameters)
        image.save(buf, format="PNG", pnginfo=info, compress_level=png_level)
    else:
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
        pil_format = "WEBP" if fmt == "webp" else "JPEG"
        image.convert("RGB").save(buf, format=pil_format, quality=95, exif=exif.tobytes())
    return buf.getvalue()

