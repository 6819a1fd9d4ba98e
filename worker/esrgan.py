"""ESRGAN-class upscalers (RRDBNet): the network, its two key layouts, tiled upscaling, warm weights.

Why written here rather than loaded with `spandrel` (the loader the web UI
uses): spandrel imports torchvision at import, and the torchvision wheel for
torch 2.13 is the CUDA build, which fails beside the CPU torch that CI and
development machines run (docs/models.md). RRDBNet itself is a few dozen
lines of plain convolutions, so it is reproduced faithfully from BasicSR's
`basicsr/archs/rrdbnet_arch.py` (as used by xinntao/Real-ESRGAN): conv_first,
num_block RRDBs of three 5-conv dense blocks with 0.2 residual scaling,
conv_body, nearest x2 upsampling convs (conv_up1, conv_up2), conv_hr,
conv_last, LeakyReLU 0.2; x2/x1 models pixel-unshuffle their input first
(Real-ESRGAN x2plus: 3 * 4 input channels). The original ESRGAN layout
(`model.0`, `model.1.sub.N.RDBk.convj.0`, `model.3/6/8/10`: 4x-UltraSharp
and most community models) is converted to those names (as_basicsr_keys).
Everything about the net is read from the weights (infer_shape).
"""
from __future__ import annotations

import logging
import math
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from common.errors import ModelError

log = logging.getLogger("sdqueue.worker")

TILE = 192            # input pixels per tile side (the web UI's ESRGAN_tile default)
TILE_OVERLAP = 16     # input pixels each tile reads past its edges, so seams see the context a whole image would
MAX_WARM_PER_MODEL = 2   # upscalers kept beside one warm pipeline
MAX_PASSES = 3        # the web UI's Upscaler.upscale applies a model at most three times to reach a size
WRAPPERS = ("params_ema", "params", "state_dict")   # Real-ESRGAN / BasicSR checkpoint wrappers, in order of preference


# --- the network (BasicSR rrdbnet_arch.py) ---------------------------------------------------------------------
class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing all earlier outputs; the result scaled by 0.2 and added to the input."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Three dense blocks in a row, the whole again scaled by 0.2 and added to the input."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


@dataclass(frozen=True)
class RRDBShape:
    """What an RRDBNet checkpoint is: channels, widths, depth, and how it reaches its scale."""

    num_in_ch: int
    num_out_ch: int
    num_feat: int
    num_grow_ch: int
    num_block: int
    num_upsample: int   # nearest x2 + conv stages (conv_up1, conv_up2, ...)
    unshuffle: int      # pixel-unshuffle factor of the input (1, 2 or 4)

    @property
    def scale(self) -> int:
        return 2 ** self.num_upsample // self.unshuffle


class RRDBNet(nn.Module):
    """BasicSR's RRDBNet; `shape.unshuffle` > 1 is Real-ESRGAN's x2/x1 variant (pixel-unshuffled input)."""

    def __init__(self, shape: RRDBShape):
        super().__init__()
        self.shape = shape
        self.conv_first = nn.Conv2d(shape.num_in_ch * shape.unshuffle ** 2, shape.num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(shape.num_feat, shape.num_grow_ch) for _ in range(shape.num_block)))
        self.conv_body = nn.Conv2d(shape.num_feat, shape.num_feat, 3, 1, 1)
        for index in range(1, shape.num_upsample + 1):
            setattr(self, f"conv_up{index}", nn.Conv2d(shape.num_feat, shape.num_feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(shape.num_feat, shape.num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(shape.num_feat, shape.num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    @property
    def scale(self) -> int:
        return self.shape.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.shape.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for index in range(1, self.shape.num_upsample + 1):
            conv = getattr(self, f"conv_up{index}")
            feat = self.lrelu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


# --- state dicts ---------------------------------------------------------------------------------------------
_OLD_RDB = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_TOP = re.compile(r"^model\.(\d+)\.(weight|bias)$")
_OLD_BODY = re.compile(r"^model\.1\.sub\.(\d+)\.(weight|bias)$")


def unwrapped(state: dict) -> dict:
    """The state dict inside Real-ESRGAN's `params_ema` / `params` (or a `state_dict`) wrapper."""
    for key in WRAPPERS:
        if isinstance(state.get(key), dict):
            return unwrapped(state[key])
    return state


def is_old_layout(state: dict) -> bool:
    return "model.0.weight" in state


def as_basicsr_keys(state: dict) -> dict:
    """The original ESRGAN layout (an nn.Sequential) in BasicSR names; a BasicSR dict is returned as it is.

    model.0 -> conv_first; model.1.sub.i.RDBk.convj.0 -> body.i.rdbk.convj;
    model.1.sub.N (after the last RRDB) -> conv_body; the other top-level
    convs in order: the upsampling convs, then conv_hr, then conv_last
    (x4: model.3, model.6, model.8, model.10; x2: model.3, model.5, model.7).
    """
    if not is_old_layout(state):
        return state
    out: dict = {}
    tops: dict[int, dict] = {}
    for key, value in state.items():
        if match := _OLD_RDB.match(key):
            block, rdb, conv, kind = match.groups()
            out[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = value
        elif match := _OLD_BODY.match(key):
            out[f"conv_body.{match.group(2)}"] = value
        elif match := _OLD_TOP.match(key):
            tops.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            raise ModelError(f"not an ESRGAN (RRDBNet) weight: {key}")
    order = sorted(tops)
    if len(order) < 3 or order[0] != 0:
        raise ModelError("not an ESRGAN (RRDBNet) checkpoint: too few top-level convolutions")
    names = ["conv_first"] + [f"conv_up{i}" for i in range(1, len(order) - 2)] + ["conv_hr", "conv_last"]
    for name, index in zip(names, order):
        for kind, value in tops[index].items():
            out[f"{name}.{kind}"] = value
    return out


def infer_shape(state: dict) -> RRDBShape:
    """Channels, widths, depth and scale of a BasicSR-named RRDBNet state dict, from its tensors' shapes."""
    try:
        first, last = state["conv_first.weight"], state["conv_last.weight"]
        grow = state["body.0.rdb1.conv1.weight"].shape[0]
    except KeyError as exc:
        raise ModelError(f"not an ESRGAN (RRDBNet) checkpoint: no {exc.args[0]}") from None
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    ups = sum(1 for k in state if re.fullmatch(r"conv_up\d+\.weight", k))
    out_ch = last.shape[0]
    factor = first.shape[1] // out_ch
    unshuffle = math.isqrt(factor)
    if unshuffle ** 2 * out_ch != first.shape[1] or unshuffle not in (1, 2, 4):
        raise ModelError(f"an RRDBNet with {first.shape[1]} input channels and {out_ch} output channels is not "
                         "ESRGAN or Real-ESRGAN (x1/x2/x4)")
    return RRDBShape(out_ch, out_ch, first.shape[0], grow, blocks, ups, unshuffle)


def read_state(path: Path) -> dict:
    """A checkpoint's tensors: .safetensors, or .pth/.pt read with weights_only (no code from the file runs)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ModelError(f"{path.name}: holds no state dict")
    return state


def build_network(state: dict) -> RRDBNet:
    """An RRDBNet with exactly the checkpoint's weights (strict: a missing or extra tensor is an error)."""
    state = as_basicsr_keys(unwrapped(state))
    network = RRDBNet(infer_shape(state))
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"not an ESRGAN (RRDBNet) checkpoint: {exc}") from None
    return network.eval().requires_grad_(False)


def load_network(path: Path, device: Any = "cpu", dtype: Any = torch.float32) -> RRDBNet:
    network = build_network(read_state(Path(path)))
    log.info("loaded upscaler %s (x%d, %d blocks)", Path(path).stem, network.scale, network.shape.num_block)
    return network.to(device=device, dtype=dtype)


# --- running it ----------------------------------------------------------------------------------------------
def run_tiled(network: RRDBNet, x: torch.Tensor, tile: int = TILE, overlap: int = TILE_OVERLAP) -> torch.Tensor:
    """The network over x (1, C, H, W): whole when it fits one tile, else tile by tile, each tile reading
    `overlap` pixels around it and keeping only its own part (Real-ESRGAN's tile_process), so memory is
    bounded by the tile, not the image."""
    _, _, height, width = x.shape
    scale = network.scale
    if height <= tile and width <= tile:
        return network(x)
    out = x.new_zeros((x.shape[0], network.shape.num_out_ch, height * scale, width * scale))
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            read_top, read_left = max(top - overlap, 0), max(left - overlap, 0)
            read_bottom, read_right = min(bottom + overlap, height), min(right + overlap, width)
            part = network(x[:, :, read_top:read_bottom, read_left:read_right])
            dy, dx = (top - read_top) * scale, (left - read_left) * scale
            out[:, :, top * scale:bottom * scale, left * scale:right * scale] = \
                part[:, :, dy:dy + (bottom - top) * scale, dx:dx + (right - left) * scale]
    return out


def upscale_once(network: RRDBNet, image: Image.Image, tile: int = TILE) -> Image.Image:
    """The image enlarged by the network's scale, in the network's dtype and on its device.

    Why padded: an unshuffling (x2/x1) model needs sides divisible by its
    factor; the image is reflect-padded and the padding cropped off after.
    """
    import numpy as np

    param = network.conv_first.weight
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(device=param.device, dtype=param.dtype)
    factor = network.shape.unshuffle
    pad_h, pad_w = -x.shape[2] % factor, -x.shape[3] % factor
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    with torch.inference_mode():
        y = run_tiled(network, x, tile)
    y = y[:, :, :image.height * network.scale, :image.width * network.scale]
    pixels = (y[0].float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels, "RGB")


def upscale_to(network: RRDBNet, image: Image.Image, width: int, height: int, tile: int = TILE) -> Image.Image:
    """The web UI's Upscaler.upscale + resize_image: the model applied (at most MAX_PASSES times) until the image
    covers width x height, then Lanczos to exactly that size."""
    for _ in range(MAX_PASSES):
        if image.width >= width and image.height >= height:
            break
        image = upscale_once(network, image, tile)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return image


# --- warm weights --------------------------------------------------------------------------------------------
_WARM: "weakref.WeakKeyDictionary[Any, OrderedDict[str, RRDBNet]]" = weakref.WeakKeyDictionary()


def warm_network(base: Any, path: Path) -> RRDBNet:
    """The upscaler at `path` in the pipeline's dtype and on its device, kept warm with the pipeline: dropped
    when the registry drops it, or when more than MAX_WARM_PER_MODEL upscalers were used with it."""
    warm = _WARM.setdefault(base, OrderedDict())
    key = f"{path}:{path.stat().st_mtime_ns}"
    if key not in warm:
        while len(warm) >= MAX_WARM_PER_MODEL:
            warm.popitem(last=False)
        warm[key] = load_network(path, base.device, base.dtype)
    warm.move_to_end(key)
    return warm[key]
