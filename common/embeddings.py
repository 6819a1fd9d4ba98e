"""Textual inversion embeddings: which files exist, their shape, and which models they fit; no torch.

Why here: the API lists them (GET /sdapi/v1/embeddings) for the caller's
current model without torch, and the worker loads the same files by the
same rule (worker/embeddings.py). The file stem is the word a prompt uses,
as in A1111. Formats, as A1111 reads them (modules/textual_inversion):
- `.pt`/`.bin` with `string_to_param: {"*": [n, width]}` (A1111's trainer,
  with `step`, `sd_checkpoint`, `sd_checkpoint_name`);
- one tensor alone (`.safetensors` with `emb_params`, diffusers'
  `{token: tensor}` .bin);
- SDXL: `clip_l` [n, 768] and `clip_g` [n, 1280] side by side.
A `.pt`'s pickle is read by an unpickler that builds nothing it names: only
shapes and the plain values come out (safetensors: the JSON header).
"""
from __future__ import annotations

import logging
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from common.checkpoint_keys import MAX_HEADER_BYTES, read_safetensors_shapes

log = logging.getLogger("sdqueue.embeddings")

SUFFIXES = (".safetensors", ".pt", ".bin")
SINGLE, CLIP_L, CLIP_G = "", "clip_l", "clip_g"     # the parts of an embedding: one tensor, or SDXL's pair
# The text width a family's embeddings must have when its model files do not say (A1111's expected shape):
# SD 1.x CLIP-L 768, SD 2.x OpenCLIP-H 1024, SDXL both (768 + 1280), the refiner OpenCLIP-bigG alone.
FAMILY_WIDTHS = {"sd1": 768, "sd2": 1024, "sdxl": 2048, "sdxl-refiner": 1280}


@dataclass(frozen=True)
class EmbeddingFacts:
    """An embedding file's vectors and training notes (A1111's EmbeddingItem)."""

    parts: Mapping[str, int]          # "" -> width, or clip_l/clip_g -> width
    vectors: int
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def shape(self) -> int:
        """A1111's `shape`: the width of one vector (both encoders' together for SDXL)."""
        return sum(self.parts.values())

    @property
    def pair(self) -> bool:
        return CLIP_L in self.parts

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint, "sd_checkpoint_name": self.sd_checkpoint_name,
                "shape": self.shape, "vectors": self.vectors}


def list_embeddings(folder: Path) -> dict[str, Path]:
    """Embedding name (file stem) -> file, in name order; the first of two files with one stem wins."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in SUFFIXES and not path.name.startswith("."):
            found.setdefault(path.stem, path)
    return found


def embedding_parts(data: Any) -> dict[str, Any]:
    """The vectors of a loaded embedding file (tensors, or shapes) by part, as A1111 tells the formats apart;
    ValueError for anything else. Works on torch tensors (the worker) and on shapes (the API)."""
    if not isinstance(data, Mapping):
        raise ValueError("not a mapping of tensors")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, Mapping) or len(params) != 1:
            raise ValueError("string_to_param must hold exactly one term")
        return {SINGLE: next(iter(params.values()))}
    if CLIP_L in data and CLIP_G in data:
        return {CLIP_L: data[CLIP_L], CLIP_G: data[CLIP_G]}
    tensors = [value for value in data.values() if hasattr(value, "shape")]
    if len(data) == 1 and tensors:
        return {SINGLE: tensors[0]}
    raise ValueError("neither string_to_param, clip_l + clip_g, nor one tensor")


def shape_facts(parts: Mapping[str, Any], notes: Mapping[str, Any]) -> EmbeddingFacts:
    """Facts from the parts' shapes ([width] is one vector, [n, width] n of them) and the file's notes."""
    shapes = {name: list(value.shape) for name, value in parts.items()}
    if any(len(s) not in (1, 2) or not s[-1] for s in shapes.values()):
        raise ValueError(f"vectors of shape {shapes} (expected [n, width])")
    counts = {1 if len(s) == 1 else s[0] for s in shapes.values()}
    if len(counts) != 1:
        raise ValueError(f"clip_l and clip_g hold different numbers of vectors: {shapes}")

    def plain(name: str, kind: type) -> Any:
        value = notes.get(name)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    return EmbeddingFacts({name: s[-1] for name, s in shapes.items()}, counts.pop(), plain("step", int),
                          plain("sd_checkpoint", str), plain("sd_checkpoint_name", str))


@dataclass(frozen=True)
class Shape:
    """What a tensor in a pickle becomes here: its shape only."""

    shape: tuple[int, ...]


class _Unbuilt:
    """Any other object a pickle names (a ParameterDict, a storage class): its state kept, nothing run."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}       # (dict state, slot state)
        if isinstance(state, dict):
            self.__dict__.update(state)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, *rest: Any) -> Shape:
    return Shape(tuple(size))


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    return data


def _reconstruct(cls: Any, base: Any = None, state: Any = None) -> Any:
    return cls() if isinstance(cls, type) and issubclass(cls, _Unbuilt) else _Unbuilt()


class _ShapesOnly(pickle.Unpickler):
    """Tensors become Shape; dicts stay dicts; every other name a stub that runs nothing."""

    KNOWN = {("collections", "OrderedDict"): OrderedDict, ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
             ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
             ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
             ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
             ("copyreg", "_reconstructor"): _reconstruct}

    def find_class(self, module: str, name: str) -> Any:
        return self.KNOWN.get((module, name)) or type(name, (_Unbuilt,), {})

    def persistent_load(self, pid: Any) -> None:   # a tensor's storage: never read
        return None


def read_pickle_state(path: Path) -> Any:
    """The object a torch file holds, tensors as shapes: the zip format's data.pkl, else torch's legacy
    format (magic number, protocol, system info, then the object)."""
    try:
        with zipfile.ZipFile(path) as archive:
            found = [i for i in archive.infolist() if i.filename.endswith("data.pkl") and i.filename.count("/") == 1]
            if not found or found[0].file_size > MAX_HEADER_BYTES:
                raise ValueError("no data.pkl of a sane size")
            with archive.open(found[0]) as handle:
                return _ShapesOnly(handle).load()
    except zipfile.BadZipFile:
        pass
    with open(path, "rb") as handle:
        for _ in range(3):
            _ShapesOnly(handle).load()
        return _ShapesOnly(handle).load()


def read_embedding_facts(path: Path) -> EmbeddingFacts:
    """An embedding file's facts; ValueError (or OSError) when it is not an embedding sdqueue can read."""
    if path.suffix.lower() == ".safetensors":
        data: Mapping[str, Any] = {name: Shape(tuple(shape)) for name, shape in read_safetensors_shapes(path).items()}
    else:
        try:
            data = read_pickle_state(path)
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, IndexError) as exc:
            raise ValueError(f"unreadable pickle ({type(exc).__name__}: {exc})") from None
    return shape_facts(embedding_parts(data), data if isinstance(data, Mapping) else {})


_FACTS: dict[tuple[str, int, int], EmbeddingFacts | None] = {}


def embedding_facts(path: Path) -> EmbeddingFacts | None:
    """read_embedding_facts cached per (path, size, mtime); None for a file that is not a readable embedding."""
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FACTS:
        try:
            _FACTS[key] = read_embedding_facts(path)
        except (OSError, ValueError) as exc:
            log.warning("embedding %s cannot be read: %s", path.name, exc)
            _FACTS[key] = None
    return _FACTS[key]


def fit_problem(facts: EmbeddingFacts, family: str, context_width: int | None = None) -> str | None:
    """Why an embedding cannot be used with a model of `family` whose text context is `context_width`
    wide (its UNet's cross-attention; None: the family's usual), or None when it fits.

    A1111's rule (the vector width equals the model's) plus the format: an
    SDXL pair for SDXL, one tensor for SD 1.x/2.x; the SDXL refiner, with
    OpenCLIP-bigG alone, takes a pair's clip_g.
    """
    expected = context_width or FAMILY_WIDTHS.get(family)
    if expected is None:
        return "textual inversion embeddings apply to SD 1.x/2.x and SDXL models only"
    if family in ("sdxl", "sdxl-refiner") and not facts.pair:
        return f"one {facts.shape}-wide tensor: SDXL takes clip_l + clip_g pairs"
    if family not in ("sdxl", "sdxl-refiner") and facts.pair:
        return "an SDXL embedding (clip_l + clip_g)"
    width = facts.parts[CLIP_G] if family == "sdxl-refiner" else facts.shape
    if width != expected:
        return f"its vectors are {width} wide and the model's text encoders {expected}"
    return None


@dataclass
class EmbeddingReport:
    """The embeddings of the folder for one model, as A1111's GET /embeddings splits them."""

    loaded: dict[str, EmbeddingFacts] = field(default_factory=dict)
    skipped: dict[str, EmbeddingFacts] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict]:
        return {"loaded": {name: facts.to_dict() for name, facts in self.loaded.items()},
                "skipped": {name: facts.to_dict() for name, facts in self.skipped.items()}}


def report_for(folder: Path, family: str, context_width: int | None) -> EmbeddingReport:
    """Which embeddings a model of `family` uses and which it skips; unreadable files are in neither (as A1111)."""
    report = EmbeddingReport()
    for name, path in list_embeddings(folder).items():
        facts = embedding_facts(path)
        if facts is not None:
            target = report.skipped if fit_problem(facts, family, context_width) else report.loaded
            target[name] = facts
    return report
