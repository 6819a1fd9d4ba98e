"""Which model family a single-file checkpoint holds, from its weight names only.

Why: the catalog must pick the pipeline class (StableDiffusionPipeline,
StableDiffusionXLPipeline, ...) for a `.safetensors`/`.ckpt` before loading it
(the SD 1.x class cannot load an SDXL file), and the API process has no torch.
So this module reads only the weight NAMES, never a tensor, and imports nothing
heavier than the standard library:
- `.safetensors`: the header (8-byte little-endian length, then JSON);
- `.ckpt`/`.pt`/`.pth` (torch's zip format): the `*/data.pkl` pickle, through an
  unpickler that stubs every class and function it names (nothing runs, no
  storage is read).

The markers are those diffusers 0.42.1 uses (diffusers/loaders/single_file_utils.py,
CHECKPOINT_KEY_NAMES and infer_diffusers_model_type), applied in the same order,
but matched by prefix where diffusers names one exact weight: diffusers' SDXL
marker `conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias`
needs >= 10 OpenCLIP layers, which tiny test models do not have. diffusers tells
some variants apart by tensor SHAPES (SD 2 by its 1024-wide cross-attention,
inpainting by 9 input channels, SD3 vs SD3.5 medium); names alone cannot, see
family_from_keys.
"""
from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from common.families import SCHNELL_DEFAULTS, SD35_DEFAULTS, read_json

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors header / pickled state-dict skeleton

UNET = "model.diffusion_model."
# CHECKPOINT_KEY_NAMES["flux"]
FLUX_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
# Families that share Flux's double_blocks naming but have their own pipelines; diffusers tests
# them before "flux": CHECKPOINT_KEY_NAMES["flux2"], ["flux3"], ["chroma"] (the original
# layout), and the Flux.2 / Chroma transformers' own names in the diffusers layout.
NOT_FLUX_1 = ("single_stream_modulation.lin.", "early_stream_modulations.", "distilled_guidance_layer.",
              "double_stream_modulation_img.", "time_guidance_embed.")


def family_from_keys(keys: Iterable[str]) -> str | None:
    """"sdxl", "sdxl-refiner", "sd3", "flux", "sd2", "sd1", or None (not one of these,
    or not a generation model: ControlNet, upscaler, VAE or text encoder alone).

    Names cannot tell: SD 2 from SD 1 in a UNet-only file (diffusers reads the
    cross-attention width), an inpainting model from its base (input channels),
    an SDXL refiner UNet alone from an SDXL base UNet alone (both "sdxl")."""
    names = set(keys)

    def starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in names)

    def has(key: str) -> bool:           # diffusers lists most markers bare and under model.diffusion_model.
        return key in names or UNET + key in names

    # CHECKPOINT_KEY_NAMES["xl_base"] / ["open_clip_sdxl"]: the OpenCLIP bigG encoder is embedder 1.
    if starts("conditioner.embedders.1."):
        return "sdxl"
    # ["xl_refiner"] / ["open_clip_sdxl_refiner"]: the refiner has only OpenCLIP, as embedder 0.
    if starts("conditioner.embedders.0.model."):
        return "sdxl-refiner"
    # ["upscale"], ["controlnet"]: SD-shaped, but not models the txt2img pipelines load.
    if has("input_blocks.10.0.skip_connection.bias") or starts("control_model.", "controlnet_cond_embedding."):
        return None
    # ["sd3"], ["sd35_large"]: MMDiT joint blocks; diffusers layout: SD3Transformer2DModel's names
    # (no single_transformer_blocks, which Flux has).
    if starts("joint_blocks.", UNET + "joint_blocks.") or (
            {"pos_embed.proj.weight", "context_embedder.weight"} <= names
            and starts("transformer_blocks.0.norm1_context.") and not starts("single_transformer_blocks.")):
        return "sd3"
    if starts(*NOT_FLUX_1, *(UNET + p for p in NOT_FLUX_1)):
        return None
    # ["flux"]; diffusers layout: FluxTransformer2DModel's names.
    if has(FLUX_MARKER) or (starts("transformer_blocks.0.attn.norm_added_k.") and starts("single_transformer_blocks.")):
        return "flux"
    # ["open_clip"]: SD 2.x conditions on OpenCLIP ViT-H; ["clip"]: SD 1.x on CLIP ViT-L.
    if starts("cond_stage_model.model."):
        return "sd2"
    if starts("cond_stage_model.transformer."):
        return "sd1"
    # A UNet alone: SDXL's has the text_time embedding (LDM label_emb.0, diffusers add_embedding).
    if starts(UNET + "input_blocks."):
        return "sdxl" if starts(UNET + "label_emb.0.") else "sd1"
    return None


def read_safetensors_keys(path: str | Path) -> list[str]:
    """The tensor names in a .safetensors file's header, in header order, without reading
    any tensor. ValueError for a file that is not safetensors or whose header is over 100 MB."""
    return list(read_safetensors_shapes(path))


def read_safetensors_shapes(path: str | Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a .safetensors header (ValueError as read_safetensors_keys)."""
    with open(path, "rb") as f:
        def read(start: int, length: int) -> bytes:
            f.seek(start)
            return f.read(length)

        return parse_safetensors_header(read, str(path))


def parse_safetensors_header(read: Callable[[int, int], bytes], where: str,
                             max_bytes: int = MAX_HEADER_BYTES) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header, through `read(start, length)`.

    Why a reader: the same two reads work on a local file and, as ranged
    GETs, on an uploaded checkpoint still in S3 (the API reads its family
    without downloading gigabytes).
    """
    prefix = read(0, 8)
    if len(prefix) != 8:
        raise ValueError(f"{where}: too short for a safetensors file")
    (size,) = struct.unpack("<Q", prefix)
    if size > max_bytes:
        raise ValueError(f"{where}: safetensors header of {size} bytes (limit {max_bytes})")
    raw = read(8, size)
    if len(raw) != size:
        raise ValueError(f"{where}: truncated safetensors header")
    try:
        header = json.loads(raw)
    except ValueError as e:          # JSONDecodeError and UnicodeDecodeError both are
        raise ValueError(f"{where}: safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: safetensors header is not a JSON object")
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise ValueError(f"{where}: tensor {name[:80]!r} has no valid shape")
        shapes[name] = shape
    return shapes


class _Stub(dict):
    """Whatever a checkpoint's pickle names (tensor rebuild functions, storages, Lightning
    objects) becomes this: callable with any arguments, accepts state and items, does nothing."""
    __hash__ = object.__hash__

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _NamesOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        return type(name, (_Stub,), {})

    def persistent_load(self, pid):  # a tensor's storage: never read
        return None


def read_ckpt_keys(path: str | Path, wrappers: tuple[str, ...] = ("state_dict",)) -> list[str]:
    """The state-dict keys of a torch zip checkpoint (.ckpt/.pt/.pth), without torch and
    without running anything the pickle names. Like diffusers' loader, follows nested
    "state_dict" entries (`wrappers`: the entries followed, first found first; Real-ESRGAN
    wraps its weights in "params_ema"). ValueError for torch's pre-1.6 format or an unreadable file."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [i for i in archive.infolist() if i.filename.count("/") == 1
                       and i.filename.endswith("/data.pkl")]
            if not pickles:
                raise ValueError(f"{path}: no */data.pkl (not a torch zip checkpoint)")
            if pickles[0].file_size > MAX_HEADER_BYTES:
                raise ValueError(f"{path}: data.pkl of {pickles[0].file_size} bytes (limit {MAX_HEADER_BYTES})")
            with archive.open(pickles[0]) as f:
                try:
                    state = _NamesOnly(f).load()
                except Exception as e:          # any malformed pickle, whatever the opcode that broke
                    raise ValueError(f"{path}: unreadable pickle ({type(e).__name__}: {e})") from None
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a zip (torch's legacy format is not read)") from None
    while isinstance(state, dict) and (inner := next((state[w] for w in wrappers
                                                      if isinstance(state.get(w), dict)), None)) is not None:
        state = inner
    if not isinstance(state, dict):
        raise ValueError(f"{path}: the pickle holds no state dict")
    return [k for k in state if isinstance(k, str)]


def read_checkpoint_keys(path: str | Path) -> list[str]:
    """Weight names of a .safetensors or torch zip (.ckpt/.pt/.pth/.bin) file."""
    if Path(path).suffix.lower() == ".safetensors":
        return read_safetensors_keys(path)
    return read_ckpt_keys(path)


def family_of_file(path: str | Path) -> str | None:
    """family_from_keys for a file; ValueError/OSError when it cannot be read."""
    return family_from_keys(read_checkpoint_keys(path))


@dataclass(frozen=True)
class CheckpointFacts:
    """What a single file's weight names and shapes say, read once (catalog listings run every 2 s)."""

    readable: bool                     # False: no names could be read (a half-copied file, torch's legacy format)
    family: str | None                 # None with readable names: not a model sdqueue serves (a VAE, a ControlNet)
    context_width: int | None = None   # a UNet's cross-attention width (which LoRAs fit it)
    variant: dict = field(default_factory=dict)   # defaults of a family variant (FLUX.1 [schnell], SD 3.5)


def read_checkpoint_facts(path: str | Path) -> CheckpointFacts:
    """Family, text width and variant of a checkpoint file; never raises for a bad file."""
    try:
        if Path(path).suffix.lower() == ".safetensors":
            shapes = read_safetensors_shapes(path)
        else:
            shapes = {name: [] for name in read_ckpt_keys(path)}
    except (OSError, ValueError):
        return CheckpointFacts(False, None)
    family = family_from_keys(shapes)
    return CheckpointFacts(bool(shapes), family, unet_context_width(shapes), variant_from_keys(family, shapes))


def unet_context_width(shapes: dict[str, list[int]]) -> int | None:
    """The text-context width a single file's UNet cross-attends to (its first attn2.to_k), or None."""
    return next((shape[-1] for name, shape in shapes.items()
                 if name.startswith(UNET) and name.endswith("attn2.to_k.weight") and len(shape) == 2), None)


def has_guidance_embedder(names: Iterable[str]) -> bool:
    """Whether a Flux transformer embeds its guidance (FLUX.1 [dev]; [schnell] does not): original
    `guidance_in.`, diffusers `.guidance_embedder.`."""
    return any(".guidance_embedder." in n or n.removeprefix(UNET).startswith("guidance_in.") for n in names)


def variant_from_keys(family: str | None, names: Iterable[str]) -> dict:
    """The defaults a variant ships with, from its weight names: FLUX.1 [schnell] has no guidance
    embedder (original `guidance_in.`, diffusers `.guidance_embedder.`); SD 3.5 normalises queries and keys
    (original `ln_q`, diffusers `norm_q`)."""
    if family not in ("flux", "sd3"):
        return {}
    names = list(names)
    if family == "flux":
        return {} if has_guidance_embedder(names) else dict(SCHNELL_DEFAULTS)
    normed = any(".ln_q." in n or ".norm_q." in n for n in names)
    return dict(SD35_DEFAULTS) if normed else {}


TRANSFORMER_INPUTS = ("x_embedder.weight", "img_in.weight",            # Flux: diffusers / original layout
                      "pos_embed.proj.weight", "x_embedder.proj.weight")  # SD3: diffusers / original layout


def checkpoint_shapes(path: str | Path) -> dict[str, list[int]]:
    """Tensor name -> shape of a .safetensors file; {} for a .ckpt or an unreadable header (nothing to check)."""
    try:
        return read_safetensors_shapes(path) if Path(path).suffix.lower() == ".safetensors" else {}
    except (OSError, ValueError):
        return {}


def architecture_matches(shapes: dict[str, list[int]], folder: str | Path) -> bool:
    """Whether a diffusers folder's denoiser config builds a single file's shapes (checkpoint_shapes): a
    UNet's input and context widths, a transformer's inner width (and Flux's guidance embedder).

    Why: the folder lends the file its configs and tokenizers (and, for SD3
    and Flux, its text encoders and VAE); a tiny test folder of the same
    family would build the wrong shapes. No shapes (a .ckpt, an unreadable
    header) pass (True): loading says what is wrong.
    """
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in:
        unet = read_json(Path(folder) / "unet" / "config.json")
        context = unet_context_width(shapes)
        return conv_in[0] == (unet.get("block_out_channels") or [None])[0] and (
            context is None or context == unet.get("cross_attention_dim"))
    embedder = next((shape for name, shape in shapes.items() if name.removeprefix(UNET) in TRANSFORMER_INPUTS), None)
    if not embedder:
        return True
    transformer = read_json(Path(folder) / "transformer" / "config.json")
    inner = (transformer.get("num_attention_heads") or 0) * (transformer.get("attention_head_dim") or 0)
    if "guidance_embeds" in transformer and has_guidance_embedder(shapes) != bool(transformer["guidance_embeds"]):
        return False
    return embedder[0] == inner


# --- LoRAs: which denoiser a LoRA file was trained on -------------------------------------------
UNET_LORA_PREFIXES = ("unet.", "lora_unet_", "model.diffusion_model.")
TRANSFORMER_LORA_PREFIXES = ("transformer.", "lora_transformer_", "diffusion_model.")
FLUX_LORA_MARKS = ("single_transformer_blocks", "single_blocks", "double_blocks")


def lora_target(path: str | Path) -> tuple[str | None, int | None]:
    """(denoiser kind, cross-attention width) a LoRA file adapts: ("unet", 768) for an SD 1.x LoRA,
    ("unet", 2048) for SDXL, ("flux", None) when Flux-only blocks are named, ("transformer", None) for
    another SD3-or-Flux LoRA; (None, None) when its names do not say.

    Why the width: SD 1.x, 2.x and SDXL LoRAs share UNet names; their
    `attn2.to_k` down-projection reads the text context, 768, 1024 or 2048
    wide, which must equal the model's (diffusers and kohya layouts alike).
    """
    try:
        shapes = read_safetensors_shapes(path)
    except (OSError, ValueError):
        return None, None
    names = list(shapes)
    if any(mark in name for name in names for mark in FLUX_LORA_MARKS):
        return "flux", None
    if any(name.startswith(TRANSFORMER_LORA_PREFIXES) for name in names):
        return "transformer", None
    if not any(name.startswith(UNET_LORA_PREFIXES) for name in names):
        return None, None
    width = next((shape[-1] for name, shape in shapes.items()
                  if "attn2" in name and "to_k" in name and ("lora_A" in name or "lora_down" in name)
                  and len(shape) == 2), None)
    return "unet", width
