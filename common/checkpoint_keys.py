"""What a single checkpoint file is, read from its tensor names and shapes without torch.

Why: the catalog (API and worker) must know a file's family (SDXL needs
SDXL's pipeline class; the SD 1.x class fails inside the UNet) and the worker
must pick a configs folder of the same architecture, before any weights load.
A safetensors file starts with its JSON header (names, dtypes, shapes), so
this costs one small read.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable

MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a .safetensors header (8-byte little-endian length, then JSON); {} if unreadable."""
    try:
        with Path(path).open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > MAX_HEADER_BYTES:
                return {}
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return {}
    return {name: list(entry.get("shape", [])) for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict)}


def read_checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a checkpoint file (.safetensors; a pickled .ckpt yields [] and is treated as SD 1.x)."""
    return list(read_safetensors_header(path)) if Path(path).suffix == ".safetensors" else []


def family_from_keys(keys: Iterable[str]) -> str | None:
    """The model family the tensor names say, with the markers diffusers' single-file loader uses
    (diffusers/loaders/single_file_utils.py: CHECKPOINT_KEY_NAMES, infer_diffusers_model_type)."""
    names = set(keys)
    if not names:
        return None

    def has(prefix: str) -> bool:
        return any(name.startswith(prefix) for name in names)

    if has("double_blocks.") or has("model.diffusion_model.double_blocks."):
        return "flux"
    if has("joint_blocks.") or has("model.diffusion_model.joint_blocks."):
        return "sd3"
    if has("conditioner.embedders.1."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        return "sdxl-refiner"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("model.diffusion_model.label_emb."):
        return "sdxl"
    if has("model.diffusion_model.input_blocks.") or has("cond_stage_model.transformer."):
        return "sd1"
    return None


def architecture_matches(checkpoint: Path, folder: Path) -> bool:
    """Whether a diffusers folder's UNet config builds the checkpoint's shapes (input width, context width).

    Transformer families and unreadable headers are trusted (True): their
    single files carry the transformer only and are checked when loading.
    """
    shapes = read_safetensors_header(checkpoint) if Path(checkpoint).suffix == ".safetensors" else {}
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    try:
        unet = json.loads((Path(folder) / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return not conv_in
    if not conv_in:
        return True
    context = next((shape for name, shape in shapes.items() if name.endswith("attn2.to_k.weight")), None)
    return conv_in[0] == unet.get("block_out_channels", [None])[0] and (
        context is None or context[1] == unet.get("cross_attention_dim"))
