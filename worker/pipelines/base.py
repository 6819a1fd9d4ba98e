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

if TYPE_CHECKING:
    from PIL import Image

    from common.catalog import ModelInfo
    from common.jobspec import JobSpec


class Family(Protocol):
    """A model family: how its models load, run, and what they default to."""

    name: str
    default_size: int        # native width/height in pixels
    default_steps: int
    default_guidance: float
    default_strength: float  # img2img/inpaint strength when a job names none

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

    def make_view(self, base: Any, spec: JobSpec, scheduler: Any) -> Any:
        """A per-request pipeline for the job's mode that shares `base`'s weights."""
        ...

    def build_call_kwargs(self, spec: JobSpec, init_image: Image.Image | None,
                          mask_image: Image.Image | None) -> dict[str, Any]:
        """The view's call arguments for the job; `strength` among them is the strength that runs.

        Orchestration adds the rest (callback, output type, images per
        prompt, generators).
        """
        ...


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
