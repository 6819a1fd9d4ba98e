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

    def load(self, model: ModelInfo, device: str, single_file_config: Path | None) -> Any:
        """The warm base pipeline for `model` on `device`."""
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


def effective_strength(strength: float, steps: int) -> float:
    """Strength that runs at least one denoising step (0.0 would run none and crash)."""
    return max(strength, 1.0 / steps)
