"""The /v1/draw API's translation: prompt, aspect ratio and quantity -> the canonical JobSpec."""
from __future__ import annotations

import math

from api.dialects.draw.schemas import RATIOS
from api.submission import resolve_seed
from common.jobspec import JobSpec


DIALECT = "draw"


def size_for(ratio: str, native: int) -> tuple[int, int]:
    """An aspect ratio at about the model's native pixel count, both sides multiples of 8."""
    a, b = RATIOS[ratio]
    width = native * math.sqrt(a / b)
    height = native * math.sqrt(b / a)
    return max(8, round(width / 8) * 8), max(8, round(height / 8) * 8)


def build_draw_jobspec(data: dict, model_name: str, native: int, defaults) -> JobSpec:
    """A draw request (validated) for `model_name` -> the canonical job, with the service's defaults."""
    width, height = size_for(data["size"], native)
    return JobSpec(prompt=data["prompt"], model=model_name, width=width, height=height,
                   num_images=data["quantity"], num_inference_steps=defaults.num_inference_steps,
                   guidance_scale=defaults.guidance_scale, seed=resolve_seed(None),
                   scheduler=defaults.scheduler or None, dialect=DIALECT)
