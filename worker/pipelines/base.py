"""What a model family must provide, and the helpers families share.

Why a protocol: the worker's orchestration (registry, LoRAs, seeds,
batching, progress) is the same for every family; only loading, views,
schedulers and the pipeline call's arguments differ. A family is any object
with these members, so one new module can add SDXL, SD3 or Flux.

No torch or diffusers at import: families import them inside methods, so
light processes (callback worker, tooling) can import this package cheaply.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from common.errors import ModelError
from common.families import PROFILES, Profile

if TYPE_CHECKING:
    from PIL import Image

    from common.catalog import ModelInfo
    from common.jobspec import JobSpec


class Family(Protocol):
    """A model family: how its models load, run, and what they default to."""

    name: str
    families: tuple[str, ...]   # the catalog's family names it serves (common/families.py)
    # The CLIP text encoders that A1111-syntax prompts are encoded with and embeddings loaded into:
    # (embedding part, tokenizer attribute, text encoder attribute); empty: prompts go in as written.
    clip_encoders: tuple[tuple[str, str, str], ...]
    penultimate: bool           # conditioning from the encoders' penultimate layer, pooled from the last (SDXL)

    def matches(self, model: ModelInfo) -> bool:
        """Whether a model in the model directory belongs to this family (no torch: reads files only)."""
        ...

    def owns(self, pipe: Any) -> bool:
        """Whether a loaded pipeline belongs to this family."""
        ...

    def cuda_dtype(self) -> str:
        """The precision `worker.dtype: auto` means for this family on CUDA (float16, bfloat16)."""
        ...

    def load(self, model: ModelInfo, device: str, single_file_config: Path | None, dtype: str) -> Any:
        """The warm base pipeline for `model` on `device`, its weights in `dtype` (a torch dtype name)."""
        ...

    def make_scheduler(self, base: Any, name: str | None, overrides: dict[str, Any] | None = None) -> Any:
        """A fresh scheduler for one request."""
        ...

    def make_view(self, base: Any, spec: JobSpec, scheduler: Any, mode: str | None = None) -> Any:
        """A per-request pipeline for `mode` (default: the job's) that shares `base`'s weights."""
        ...

    def build_call_kwargs(self, spec: JobSpec, init_image: Image.Image | None,
                          mask_image: Image.Image | None) -> dict[str, Any]:
        """The view's call arguments for the job; `strength` among them is the strength that runs.

        Orchestration adds the rest (callback, output type, images per
        prompt, generators).
        """
        ...


class DiffusersFamily:
    """What every family shares: diffusers folders through AutoPipeline, single files through the
    family's own pipeline class, views on the base's weights, schedulers rebuilt from the model's config.

    A family module subclasses this and says what differs (its pipeline
    classes, its single-file class, its call arguments).
    """

    name = ""
    families: tuple[str, ...] = ()
    pipeline_classes: tuple[str, ...] = ()   # diffusers classes whose instances this family runs
    single_file_class = ""                   # the diffusers class that reads this family's single files
    clip_encoders: tuple[tuple[str, str, str], ...] = ()   # SD3 and Flux (T5 besides CLIP): prompts as written
    penultimate = False

    @property
    def profile(self) -> Profile:
        return PROFILES[self.families[0]]

    def matches(self, model: ModelInfo) -> bool:
        """The catalog's family of the model (read from its files) is one of this family's."""
        return model.family in self.families

    def owns(self, pipe: Any) -> bool:
        """The loaded pipeline is one of this family's classes."""
        return type(pipe).__name__ in self.pipeline_classes

    def cuda_dtype(self) -> str:
        return self.profile.cuda_dtype

    def load(self, model: ModelInfo, device: str, single_file_config: Path | None, dtype: str) -> Any:
        """Load one model onto `device`, its weights in `dtype`: a folder as its model_index.json says,
        a single file with this family's class and a local folder of the same architecture for its configs."""
        import torch
        import diffusers

        common = dict(dtype=getattr(torch, dtype), local_files_only=True, **self.load_options())
        if model.kind == "diffusers":
            pipe = diffusers.DiffusionPipeline.from_pretrained(str(model.path), **common)
        else:
            config = single_file_config or find_config_folder(model, self)
            if config is None:
                raise ModelError(f"{model.name}: a single-file {self.profile.label} checkpoint needs a local "
                                 f"diffusers folder of the same architecture for its configs and tokenizers "
                                 f"(put one in the model directory, or set models.single_file_config)")
            pipe = self.load_single_file(model.path, config, common)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_single_file(self, path: Path, config: Path, common: dict[str, Any]) -> Any:
        """A whole pipeline from one original-layout checkpoint, its configs and tokenizers from `config`."""
        import diffusers

        cls = getattr(diffusers, self.single_file_class)
        return cls.from_single_file(str(path), config=str(config), **common)

    def load_options(self) -> dict[str, Any]:
        """Extra from_pretrained/from_single_file arguments of this family."""
        return {}

    def make_scheduler(self, base: Any, name: str | None, overrides: dict[str, Any] | None = None) -> Any:
        """A fresh scheduler instance: the named diffusers class, or a copy of the model's own.

        `overrides` (e.g. use_karras_sigmas, algorithm_type) turn one class into
        the A1111 sampler variants, as diffusers' scheduler docs map them.
        """
        import diffusers

        cls = getattr(diffusers, name) if name else type(base.scheduler)
        return cls.from_config(base.scheduler.config, **(overrides or {}))

    def make_view(self, base: Any, spec: JobSpec, scheduler: Any, mode: str | None = None) -> Any:
        """A per-request pipeline for `mode` (the job's by default; a refiner pass asks for img2img),
        on `base`'s very weights, with its own scheduler.

        Why views: a per-request scheduler must never be assigned on the
        shared base, which other requests use; and nothing may convert or
        copy the shared weights (share_weights).
        """
        return share_weights(task_class(base, mode or spec.mode), base, scheduler=scheduler)

    def build_call_kwargs(self, spec: JobSpec, init_image: Image.Image | None,
                          mask_image: Image.Image | None) -> dict[str, Any]:
        """Prompt, steps and guidance; width/height for txt2img, the resized image(s) and strength otherwise."""
        kwargs: dict[str, Any] = dict(prompt=spec.prompt, num_inference_steps=spec.num_inference_steps,
                                      guidance_scale=spec.guidance_scale, **self.negative_kwargs(spec))
        if spec.mode == "txt2img":
            kwargs.update(width=spec.width, height=spec.height)
            return kwargs
        if init_image is None:
            raise ModelError(f"{spec.mode} job without its init image")
        strength = spec.strength if spec.strength is not None else self.profile.strength
        kwargs.update(image=init_image.convert("RGB").resize((spec.width, spec.height)),
                      strength=effective_strength(strength, spec.num_inference_steps), **self.image_size_kwargs(spec))
        if spec.mode == "inpaint":
            if mask_image is None:
                raise ModelError("inpaint job without its mask")
            kwargs.update(mask_image=mask_image.convert("L").resize((spec.width, spec.height)),
                          width=spec.width, height=spec.height)
        return kwargs

    def negative_kwargs(self, spec: JobSpec) -> dict[str, Any]:
        """The negative prompt, for families with classifier-free guidance."""
        return {"negative_prompt": spec.negative_prompt or None}

    def image_size_kwargs(self, spec: JobSpec) -> dict[str, Any]:
        """Output size for img2img, for pipelines that would otherwise make their native size."""
        return {}


class TransformerFamily(DiffusersFamily):
    """SD3 and Flux: their single files are the transformer (what fine-tunes ship); the text encoders
    (T5-XXL alone is ~9 GB) and VAE come from a full diffusers folder of the same family."""

    transformer_class = ""

    def load_single_file(self, path: Path, config: Path, common: dict[str, Any]) -> Any:
        """The file's transformer (original or diffusers layout) in the folder's pipeline."""
        import diffusers

        transformer = getattr(diffusers, self.transformer_class).from_single_file(
            str(path), config=str(config), subfolder="transformer", **common)
        return diffusers.DiffusionPipeline.from_pretrained(str(config), transformer=transformer, **common)


CONFIGS_DIR = ".configs"   # in the model directory: diffusers folders without weights, for single files only


def find_config_folder(model: ModelInfo, family: DiffusersFamily) -> Path | None:
    """A diffusers folder of a single file's family and architecture, for its configs and tokenizers:
    one in the model directory's `.configs/` (configs only, never listed as a model), else a model folder.

    Why the architecture check: the model directory may hold a tiny test
    folder of the same family; its configs would build the wrong shapes.
    """
    from common.catalog import OWNED_DIR, list_models
    from common.checkpoint_keys import architecture_matches, checkpoint_shapes

    shapes = checkpoint_shapes(model.path)          # read once, compared with every candidate
    folder = model.path.parent
    if folder.name == OWNED_DIR:                    # a key's own file a job fetched: the model directory's folders
        folder = folder.parent
    candidates = list_models(folder / CONFIGS_DIR) + list_models(folder)
    for candidate in candidates:
        if candidate.kind == "diffusers" and candidate.family == model.family \
                and architecture_matches(shapes, candidate.path):
            return candidate.path
    return None


DTYPES = ("float16", "bfloat16", "float32")
PIPELINE_TASKS = ("txt2img", "img2img", "inpaint")


def resolve_dtype(setting: str, family: Family, device: str) -> str:
    """worker.dtype for a model of `family` on `device`: auto is the family's choice on CUDA, float32 elsewhere."""
    if setting == "auto":
        return family.cuda_dtype() if device.startswith("cuda") else "float32"
    if setting not in DTYPES:
        raise ValueError(f"worker.dtype {setting!r}: expected auto or one of {', '.join(DTYPES)}")
    return setting


def task_class(base: Any, mode: str) -> type:
    """The diffusers pipeline class that runs `mode` (txt2img, img2img, inpaint) for the family of `base`.

    From diffusers' own AutoPipeline tables (the same lookup AutoPipeline*.from_pipe does).
    """
    from diffusers.pipelines import auto_pipeline

    tables = {"txt2img": auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
              "img2img": auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
              "inpaint": auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING}
    for table in tables.values():
        for key, cls in table.items():
            if cls is type(base) and key in tables[mode]:
                return tables[mode][key]
    raise ValueError(f"{type(base).__name__} has no {mode} pipeline in diffusers")


def share_weights(cls: type, base: Any, **replaced: Any) -> Any:
    """A `cls` pipeline built on `base`'s very module objects (and config), with `replaced` components.

    Why not diffusers' pipe-to-pipe constructor: in diffusers 0.42, called
    without a torch_dtype, it converts the shared base to float32 in place
    (diffusers#12754), and with one it costs ~10 ms; building the view from
    the same modules takes ~2 ms and converts and copies nothing
    (tests/test_precision.py).
    """
    import inspect

    wanted = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    components = base.components
    kwargs = {name: components[name] for name in wanted if name in components}
    kwargs.update({name: base.config[name] for name in wanted if name not in kwargs and name in base.config})
    kwargs.update(replaced)
    view = cls(**kwargs)
    view.set_progress_bar_config(disable=True)
    return view


def effective_strength(strength: float, steps: int) -> float:
    """Strength that runs at least one denoising step (0.0 would run none and crash)."""
    return max(strength, 1.0 / steps)
