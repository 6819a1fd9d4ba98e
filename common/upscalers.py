"""Upscalers by the names the AUTOMATIC1111 web UI gives them, and the sizes its hires fix and extras upscale to.

Why one module: the API checks a name and a size before anything is
queued (hr_upscaler, extras' upscaler_1), and the worker runs the same
table, so a name the API accepts is one the worker can run. Two kinds:
latent modes (the web UI's shared.latent_upscale_modes: interpolating the
first pass's latents, hires fix only), pixel upscalers (PIL resamplers;
"None" is the web UI's plain Lanczos resize) and model upscalers: ESRGAN /
Real-ESRGAN (RRDBNet) files in models.upscalers_dir, run by the worker in
the hires fix only (worker/esrgan.py; docs/models.md).

No torch here: the API imports it. Model upscalers are described from
their weight names (and shapes, in a safetensors header) alone.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from common.checkpoint_keys import read_ckpt_keys, read_safetensors_shapes

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


MODEL_SUFFIXES = (".pth", ".pt", ".safetensors")
WRAPPERS = ("params_ema", "params", "state_dict")    # Real-ESRGAN / BasicSR checkpoint wrappers
_UPSAMPLE = re.compile(r"^conv_up\d+\.weight$")
_OLD_TOP = re.compile(r"^model\.(\d+)\.weight$")


@dataclass(frozen=True)
class ModelUpscaler:
    """An ESRGAN-class file: its name (the file stem, as the web UI lists it), layout and scale (None: unknown)."""

    name: str
    path: Path
    model_name: str          # "ESRGAN" (the original layout) or "RealESRGAN" (BasicSR's names)
    scale: int | None

    def to_item(self) -> dict:
        """The web UI's UpscalerItem."""
        return {"name": self.name, "model_name": self.model_name, "model_path": str(self.path), "model_url": None,
                "scale": self.scale}


def weight_shapes(path: Path) -> dict[str, list[int]]:
    """Weight name -> shape ([] where only names can be read: a .pth pickle); {} when unreadable."""
    try:
        if path.suffix.lower() == ".safetensors":
            return read_safetensors_shapes(path)
        return {name: [] for name in read_ckpt_keys(path, WRAPPERS)}
    except (OSError, ValueError):
        return {}


def rrdb_scale(shapes: dict[str, list[int]], old: bool) -> int | None:
    """2 ** (upsampling convs), divided by the input's pixel-unshuffle factor when the shapes tell it (Real-ESRGAN
    x2/x1 models unshuffle); None when they cannot (a .pth read by names only)."""
    if old:     # model.0 conv_first, model.1 the body, then the upsampling convs, conv_hr, conv_last
        return 2 ** (len([k for k in shapes if _OLD_TOP.match(k) and k != "model.1.weight"]) - 3)
    ups = sum(1 for k in shapes if _UPSAMPLE.match(k))
    first, last = shapes.get("conv_first.weight", []), shapes.get("conv_last.weight", [])
    if len(first) != 4 or len(last) != 4:
        return None
    unshuffle = math.isqrt(max(first[1] // max(last[0], 1), 1))
    return max(1, 2 ** ups // unshuffle)


def describe_model_upscaler(path: Path) -> ModelUpscaler | None:
    """The file as an upscaler, or None when its weights are not an RRDBNet in either layout."""
    shapes = weight_shapes(path)
    if "model.0.weight" in shapes and any(k.startswith("model.1.sub.0.RDB1.") for k in shapes):
        return ModelUpscaler(path.stem, path, "ESRGAN", rrdb_scale(shapes, old=True))
    if "conv_first.weight" in shapes and "body.0.rdb1.conv1.weight" in shapes:
        return ModelUpscaler(path.stem, path, "RealESRGAN", rrdb_scale(shapes, old=False))
    return None


_DESCRIBED: dict[tuple[str, int, int], ModelUpscaler | None] = {}


def list_model_upscalers(folder: Path) -> dict[str, ModelUpscaler]:
    """Name -> ESRGAN-class upscaler in `folder` (files of other architectures, and names the built-in upscalers
    already use, are left out); each file read once per (size, mtime)."""
    if not folder.is_dir():
        return {}
    found: dict[str, ModelUpscaler] = {}
    for path in sorted(folder.iterdir(), key=lambda p: (p.stem, p.suffix)):     # by name, as listed
        if not path.is_file() or path.suffix.lower() not in MODEL_SUFFIXES or path.name.startswith("."):
            continue
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _DESCRIBED:
            _DESCRIBED[key] = describe_model_upscaler(path)
        model = _DESCRIBED[key]
        if model is not None and not is_builtin(model.name):
            found.setdefault(model.name, model)
    return found


def is_latent(name: str) -> bool:
    return name in LATENT_MODES


def is_builtin(name: str) -> bool:
    return name in LATENT_MODES or name in PIXEL_UPSCALERS


def is_known(name: str, folder: Path | None = None) -> bool:
    """A latent mode, a resampler, or a model upscaler in `folder` (models.upscalers_dir)."""
    return is_builtin(name) or (folder is not None and name in list_model_upscalers(folder))


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
