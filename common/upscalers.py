"""Upscalers by the names the AUTOMATIC1111 web UI gives them, and the sizes its hires fix and extras upscale to.

Why one module: the API checks a name and a size before anything is
queued (hr_upscaler, extras' upscaler_1), and the worker runs the same
table, so a name the API accepts is one the worker can run. Two kinds:
latent modes (the web UI's shared.latent_upscale_modes: interpolating the
first pass's latents, hires fix only) and pixel upscalers (PIL resamplers;
"None" is the web UI's plain Lanczos resize). ESRGAN-class models are not
served: see docs/models.md (models/upscalers).

No torch here: the API imports it.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

# name -> (torch.nn.functional.interpolate mode, antialias), as the web UI's shared.latent_upscale_modes
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
DEFAULT_HIRES_UPSCALER = "Latent"   # what the web UI uses when hr_upscaler is not given
# name -> PIL resampler. "None" resizes with Lanczos in the hires fix (the web UI's images.resize_image); in
# extras it means no upscaling at all (NO_UPSCALE).
PIXEL_UPSCALERS: dict[str, Image.Resampling] = {
    "None": Image.Resampling.LANCZOS,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
NO_UPSCALE = "None"
LISTED_SCALE = 4.0   # the `scale` /sdapi/v1/upscalers reports for the resamplers (the web UI's value)


def is_latent(name: str) -> bool:
    return name in LATENT_MODES


def is_known(name: str) -> bool:
    return name in LATENT_MODES or name in PIXEL_UPSCALERS


def resize_pixels(image: Image.Image, width: int, height: int, name: str) -> Image.Image:
    """`image` at width x height with the pixel upscaler `name`."""
    if image.size == (width, height):
        return image
    return image.convert("RGB").resize((width, height), resample=PIXEL_UPSCALERS[name])


@dataclass(frozen=True)
class HiresSize:
    """Where the hires fix upscales to, and the part it keeps (the web UI's hr_upscale_to_x/y and truncate_x/y).

    Both sizes are rounded down to the family's multiple (the web UI's
    latents floor them to 8); `width`/`height` is the output size.
    """

    upscale_width: int
    upscale_height: int
    width: int
    height: int

    @property
    def cropped(self) -> bool:
        return (self.width, self.height) != (self.upscale_width, self.upscale_height)


def round_down(value: float, multiple: int) -> int:
    return int(value) // multiple * multiple


def hires_size(width: int, height: int, scale: float, resize_x: int, resize_y: int, multiple: int) -> HiresSize:
    """The web UI's calculate_target_resolution: hr_scale when no hr_resize_x/y is given; one of them keeps the
    aspect ratio; both cover that box and then crop its centre."""
    if not resize_x and not resize_y:
        up_x, up_y = int(width * scale), int(height * scale)
        target = (up_x, up_y)
    elif not resize_y:
        up_x, up_y = resize_x, resize_x * height // width
        target = (up_x, up_y)
    elif not resize_x:
        up_x, up_y = resize_y * width // height, resize_y
        target = (up_x, up_y)
    else:
        if width / height < resize_x / resize_y:
            up_x, up_y = resize_x, resize_x * height // width
        else:
            up_x, up_y = resize_y * width // height, resize_y
        target = (resize_x, resize_y)
    up_x, up_y = round_down(up_x, multiple), round_down(up_y, multiple)
    return HiresSize(up_x, up_y, min(up_x, round_down(target[0], multiple)), min(up_y, round_down(target[1], multiple)))


def extras_size(width: int, height: int, mode: int, scale: float, to_width: int, to_height: int) -> tuple[int, int]:
    """The size an extras upscale makes (before its crop): the web UI's Upscaler.upscale floors it to 8.

    mode 0: by `scale`; mode 1: by the larger of the two ratios that reach to_width x to_height.
    """
    if mode == 1:
        scale = max(to_width / width, to_height / height)
    return max(8, round_down(width * scale, 8)), max(8, round_down(height * scale, 8))


def centre_box(width: int, height: int, to_width: int, to_height: int) -> tuple[int, int, int, int]:
    """The box of a width x height picture that keeps its centre at to_width x to_height."""
    left, top = (width - to_width) // 2, (height - to_height) // 2
    return left, top, left + to_width, top + to_height
