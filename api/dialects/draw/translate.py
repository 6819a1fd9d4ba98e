"""The /v1/draw API's translation: prompt, aspect ratio and quantity -> the canonical JobSpec."""
from __future__ import annotations

import math

from api.dialects.draw.schemas import RATIOS
from api.submission import resolve_seed
from common.catalog import ModelInfo
from common.jobspec import JobSpec


DIALECT = "draw"


def size_for(ratio: str, native: int, multiple: int = 8) -> tuple[int, int]:
    """An aspect ratio at about the model's native pixel count (512² class for SD 1.x, 1024² for SDXL, SD3
    and Flux), both sides multiples of what the model's family needs."""
    a, b = RATIOS[ratio]
    width = native * math.sqrt(a / b)
    height = native * math.sqrt(b / a)
    return max(multiple, round(width / multiple) * multiple), max(multiple, round(height / multiple) * multiple)


def build_draw_jobspec(data: dict, model: ModelInfo, scheduler: str | None) -> JobSpec:
    """A draw request (validated) for `model` -> the canonical job, with the model's defaults."""
    defaults = model.request_defaults
    width, height = size_for(data["size"], defaults.width, model.profile.size_multiple)
    return JobSpec(prompt=data["prompt"], model=model.name, width=width, height=height,
                   num_images=data["quantity"], num_inference_steps=defaults.steps,
                   guidance_scale=defaults.guidance_scale, seed=resolve_seed(None),
                   scheduler=defaults.scheduler or scheduler, dialect=DIALECT, family=model.family)
