"""ControlNet models in the ControlNet directory, read without torch (folders and single files).

Why: the API must refuse an unknown ControlNet, or one of another model
generation, with a 422 naming the field before queueing, and list them as
sd-webui-controlnet's `/controlnet/model_list` does ("name [hash]"); the
worker loads what the job names from the same directory (worker/controlnet.py).
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from common.catalog import ModelInfo, hash_model_files

SUFFIXES = (".safetensors", ".ckpt", ".pth", ".bin")
PREPROCESSORS = ("none", "canny")          # sd-webui-controlnet module names sdqueue runs
CANNY_LOW, CANNY_HIGH, PROCESSOR_RES = 100, 200, 512   # the extension's canny defaults
RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")
GROUPS = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl"}    # model families a ControlNet may condition, by generation
MAX_UNITS = 4                              # units one job may carry (each is a second UNet encoder per step)
_HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]\s*$")


@dataclass(frozen=True)
class ControlNetInfo:
    """A ControlNet: where it is, the model generation it conditions (sd: SD 1.x/2.x, sdxl) and its text width."""

    name: str
    path: Path
    kind: str                        # "diffusers" folder or "single_file"
    group: str                       # "sd" or "sdxl"
    context_width: int | None = None

    @property
    def title(self) -> str:
        """As sd-webui-controlnet lists it: "name [hash]"."""
        return f"{self.name} [{short_hash(self.path)}]"

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "type": self.kind,
                "family": {"sd": "sd1", "sdxl": "sdxl"}[self.group], "context_width": self.context_width}


def describe_folder(entry: Path) -> ControlNetInfo:
    config = json.loads((entry / "config.json").read_text())
    group = "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"
    width = config.get("cross_attention_dim")
    return ControlNetInfo(entry.name, entry, "diffusers", group, width if isinstance(width, int) else None)


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header ({} when it cannot be read)."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                return {}
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return {}
    return {k: v.get("shape", []) for k, v in header.items() if isinstance(v, dict)}


def describe_file(entry: Path) -> ControlNetInfo:
    """A single file: SDXL when it has SDXL's added (text-time) embedding; its text width from a cross-attention
    key; .pth/.ckpt names are not read (SD 1.x/2.x assumed, the loader checks)."""
    shapes = safetensors_shapes(entry) if entry.suffix == ".safetensors" else {}
    xl = any(k.endswith(("add_embedding.linear_1.weight", "label_emb.0.0.weight")) for k in shapes)
    width = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2), None)
    return ControlNetInfo(entry.stem, entry, "single_file", "sdxl" if xl else "sd", width)


def list_controlnets(folder: Path) -> dict[str, ControlNetInfo]:
    """ControlNet name (folder name, or file stem) -> its description."""
    if not folder.is_dir():
        return {}
    found = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir() and (entry / "config.json").exists():
                found[entry.name] = describe_folder(entry)
            elif entry.is_file() and entry.suffix in SUFFIXES:
                found.setdefault(entry.stem, describe_file(entry))
        except (OSError, ValueError):
            continue                 # one odd entry must not hide the others
    return found


def find_controlnet(controlnets: dict[str, ControlNetInfo], wanted: str) -> ControlNetInfo | None:
    """A ControlNet by any name the extension's clients send: "name", "name [hash]", or the file name."""
    name = _HASH.sub("", wanted or "").strip()
    if name in controlnets:
        return controlnets[name]
    return next((c for c in controlnets.values() if c.path.name == name), None)


def fit_problem(controlnet: ControlNetInfo, model: ModelInfo) -> str | None:
    """Why `controlnet` cannot condition `model` (another generation, another text width), or None."""
    group = GROUPS.get(model.family)
    if group is None:
        return f"ControlNet runs with SD 1.x/2.x and SDXL models, not {model.profile.label}"
    if group != controlnet.group:
        made = "SDXL" if controlnet.group == "sdxl" else "SD 1.x/2.x"
        return f"{controlnet.name} is a ControlNet for {made} models, not {model.profile.label}"
    if controlnet.context_width and model.context_width and controlnet.context_width != model.context_width:
        return (f"{controlnet.name}'s text context is {controlnet.context_width} wide and {model.name}'s is "
                f"{model.context_width} (a ControlNet of another Stable Diffusion generation)")
    return None


_SHORT: dict[tuple[str, int, int], str] = {}


def short_hash(path: Path) -> str:
    """The 8 hex digits sd-webui-controlnet shows: the web UI's old model hash of a file (sha256 of 64 KiB
    at 1 MiB; the whole file when smaller), and for a diffusers folder its files' sha256 (catalog)."""
    try:
        stat = path.stat()
    except OSError:
        return "00000000"
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHORT:
        if path.is_file():
            with path.open("rb") as handle:
                handle.seek(0x100000)
                chunk = handle.read(0x10000)
                if not chunk:
                    handle.seek(0)
                    chunk = handle.read(0x10000)
            _SHORT[key] = hashlib.sha256(chunk).hexdigest()[:8]
        else:
            _SHORT[key] = hash_model_files(path)[:8]
    return _SHORT[key]
