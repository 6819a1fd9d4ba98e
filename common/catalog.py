"""What models and LoRAs exist, read from their directories without torch.

Why: the API must refuse an unknown model or LoRA with a 422 before
queueing, and report native sizes, while never importing diffusers.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from common.checkpoint_keys import CheckpointFacts, lora_target, read_checkpoint_facts
from common.families import (PROFILES, ModelDefaults, Profile, detect_folder_family, folder_native_size,
                             folder_variant_defaults, model_defaults, override_fit_problem, read_json,
                             with_override_family)

WEIGHT_SUFFIXES = (".safetensors", ".ckpt")
DEFAULT_SINGLE_FILE_FAMILY = "sd1"   # what a single file is when its names say nothing (an SD 1.x UNet alone)


@dataclass(frozen=True)
class ModelInfo:
    """A model in the model directory: where it is, its family, and what a request without values gets."""

    name: str
    path: Path
    kind: str  # "diffusers" folder or "single_file"
    native_size: int
    family: str = DEFAULT_SINGLE_FILE_FAMILY
    defaults: ModelDefaults | None = None
    problem: str | None = None   # why it cannot be served (an unknown pipeline class), or None
    context_width: int | None = None   # a UNet's cross-attention width (which LoRAs fit); None: unknown or no UNet

    @property
    def profile(self) -> Profile:
        return PROFILES[self.family]

    @property
    def request_defaults(self) -> ModelDefaults:
        return self.defaults or model_defaults(self.family, self.native_size, {}, None)

    def to_dict(self) -> dict:
        profile = self.profile
        return {"name": self.name, "type": self.kind, "family": self.family, "family_label": profile.label,
                "width": self.request_defaults.width, "height": self.request_defaults.height,
                "size_multiple": profile.size_multiple, "schedule": profile.schedule,
                "negative_prompt": profile.negative_prompt, "txt2img": profile.txt2img,
                "defaults": self.request_defaults.to_dict(), "problem": self.problem}


def describe_folder(entry: Path, override: Mapping | None) -> ModelInfo:
    """A diffusers folder: family from model_index.json, native size and variant defaults from its configs."""
    detected = detect_folder_family(entry)
    problem = None
    if detected is None:
        pipeline = read_json(entry / "model_index.json").get("_class_name", "?")
        problem = f"{pipeline} is not a pipeline sdqueue serves (SD 1.x/2.x, SDXL, SD3, Flux)"
    family = with_override_family(detected, override) or DEFAULT_SINGLE_FILE_FAMILY
    problem = problem or override_fit_problem(PROFILES[family], override)
    # Each config read once (the API lists the directory every 2 s).
    unet, transformer = read_json(entry / "unet" / "config.json"), read_json(entry / "transformer" / "config.json")
    native = folder_native_size(read_json(entry / "vae" / "config.json"), unet or transformer, family)
    defaults = model_defaults(family, native, folder_variant_defaults(transformer, family), override)
    context = unet.get("cross_attention_dim")
    return ModelInfo(entry.name, entry, "diffusers", native, family, defaults, problem,
                     context if isinstance(context, int) else None)


def describe_single_file(entry: Path, override: Mapping | None) -> ModelInfo:
    """A single checkpoint: family, text width and variant from its weight names (the safetensors header,
    a .ckpt's pickle); SD 1.x when no names can be read (as before families existed)."""
    facts = checkpoint_facts(entry)
    problem = None
    if not facts.readable and entry.suffix == ".safetensors":
        problem = "its safetensors header cannot be read (a broken or half-copied file?)"
    elif facts.readable and facts.family is None:
        problem = "its weights are not a model sdqueue serves (SD 1.x/2.x, SDXL, SD3, Flux): a VAE, LoRA or ControlNet?"
    if with_override_family(None, override):     # the operator said what it is
        problem = None
    model = single_file_model(entry.name, entry, facts.family, override, facts.variant, facts.context_width)
    return replace(model, problem=problem or override_fit_problem(model.profile, override))


def single_file_model(name: str, path: Path, family: str | None, override: Mapping | None,
                      variant: Mapping | None = None, context_width: int | None = None) -> ModelInfo:
    """A single file of `family` (the operator's models.overrides family first; SD 1.x when unknown) with its
    family's native size and defaults; also how an upload still in S3 is described (the AWS extension)."""
    family = with_override_family(family, override) or DEFAULT_SINGLE_FILE_FAMILY
    native = PROFILES[family].native_size
    return ModelInfo(name, path, "single_file", native, family, model_defaults(family, native, variant or {}, override),
                     context_width=context_width)


_FACTS: dict[tuple[str, int, int], CheckpointFacts] = {}


def checkpoint_facts(path: Path) -> CheckpointFacts:
    """A checkpoint's facts, cached per (path, size, mtime): headers of big files are megabytes."""
    try:
        stat = path.stat()
    except OSError:
        return CheckpointFacts(False, None)
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _FACTS:
        _FACTS[cache_key] = read_checkpoint_facts(path)
    return _FACTS[cache_key]


def list_models(models_dir: Path, overrides: Mapping[str, Mapping] | None = None) -> list[ModelInfo]:
    """Diffusers folders (with model_index.json) and single checkpoint files, each with its family.

    `overrides`: models.overrides, per model name (request defaults, or a forced family).
    """
    if not models_dir.is_dir():
        return []
    overrides = overrides or {}
    found: list[ModelInfo] = []
    for entry in sorted(models_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir() and (entry / "model_index.json").exists():
                found.append(describe_folder(entry, overrides.get(entry.name)))
            elif entry.is_file() and entry.suffix in WEIGHT_SUFFIXES:
                found.append(describe_single_file(entry, overrides.get(entry.name)))
        except Exception as exc:  # noqa: BLE001 - one odd file must not take the listing (and /health) down
            kind = "diffusers" if entry.is_dir() else "single_file"
            found.append(ModelInfo(entry.name, entry, kind, PROFILES[DEFAULT_SINGLE_FILE_FAMILY].native_size,
                                   problem=f"cannot be read: {type(exc).__name__}: {exc}"))
    return found


OWNED_DIR = ".owned"   # under the model and LoRA directories: the keys' own files workers fetched (owned_dir)


def find_model(models_dir: Path, name: str, overrides: Mapping[str, Mapping] | None = None) -> ModelInfo | None:
    """The model called `name`, or None."""
    return next((m for m in list_models(models_dir, overrides) if m.name == name), None)


def owned_dir(base: Path) -> Path:
    """Where a worker keeps the keys' own files (uploaded or made checkpoints and LoRAs) it fetched from S3.

    Why a hidden folder: the model and LoRA directories are shared listings
    (every key sees them, and the default model is their first entry); a
    key's own file copied there would show in them and be usable by every
    key under its worker-side name. Dot-names are never listed.
    """
    return base / OWNED_DIR


def locate_model(models_dir: Path, name: str, overrides: Mapping[str, Mapping] | None = None) -> ModelInfo | None:
    """A model of the shared directory, else a key's own file a job fetched (its name holds the checkpoint id;
    only that file is read, however many the folder holds)."""
    found = find_model(models_dir, name, overrides)
    if found is not None:
        return found
    path = owned_dir(models_dir) / name
    if name.startswith(".") or "/" in name or not path.is_file() or path.suffix not in WEIGHT_SUFFIXES:
        return None
    return describe_single_file(path, (overrides or {}).get(name))


def worker_loras(lora_dir: Path) -> dict[str, Path]:
    """The LoRA files a worker may apply: the shared directory's, and the keys' own that jobs fetched (a job
    names those by their worker-side names, which no listing shows)."""
    return {**list_loras(owned_dir(lora_dir)), **list_loras(lora_dir)}


def pick_default(configured: str, models: list[ModelInfo]) -> str | None:
    """The configured default, else the first model in the directory that can make images from text."""
    usable = [m for m in models if m.problem is None and m.profile.txt2img]
    return configured or (usable[0].name if usable else None)


def default_model_name(models_dir: Path, configured: str) -> str | None:
    return pick_default(configured, list_models(models_dir) if not configured else [])


def lora_problem(lora: Path, model: ModelInfo) -> str | None:
    """Why a LoRA file cannot adapt `model` (another family's denoiser, another text width), or None.

    A LoRA whose names say nothing is let through: loading it is the test.
    """
    kind, width = lora_target(lora)
    if kind is None:
        return None
    fits = {"unet": ("sd1", "sd2", "sdxl", "sdxl-refiner"), "transformer": ("sd3", "flux"), "flux": ("flux",)}
    if model.family not in fits[kind]:
        trained = {"unet": "a UNet model (SD 1.x/2.x/SDXL)", "transformer": "SD3 or Flux", "flux": "Flux"}[kind]
        return f"it was trained for {trained}, not {model.profile.label}"
    if kind == "unet" and width and model.context_width and width != model.context_width:
        return (f"its text context is {width} wide and {model.name}'s is {model.context_width} "
                f"(a LoRA of another Stable Diffusion generation)")
    return None


def list_loras(lora_dir: Path) -> dict[str, Path]:
    """LoRA name (file stem) -> weights file."""
    if not lora_dir.is_dir():
        return {}
    return {p.stem: p for p in sorted(lora_dir.iterdir())
            if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith(".")}


_HASHES: dict[tuple[str, int, int], str] = {}


def hash_model_files(path: Path) -> str:
    """A file's sha256, or a folder's over its files' names and sizes and its JSON configs."""
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    else:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path)}:{file.stat().st_size}\n".encode())
            if file.suffix == ".json":
                digest.update(file.read_bytes())
    return digest.hexdigest()


def model_sha256(model: ModelInfo) -> str:
    """sha256 identifying a model, cached per (path, size, mtime) for the process.

    Single files: the file's sha256, as A1111 computes it (so its 10-char
    short hash matches A1111's). Diffusers folders: a sha256 over each file's
    relative path and size plus the contents of its JSON configs, cheap
    for multi-GB folders and stable across copies.
    """
    try:
        stat = model.path.stat()
        cache_key = (str(model.path), stat.st_size, stat.st_mtime_ns)
        if cache_key not in _HASHES:
            _HASHES[cache_key] = hash_model_files(model.path)
    except OSError:
        return ""          # removed since the directory was listed (the listing is up to 2 s old)
    return _HASHES[cache_key]
