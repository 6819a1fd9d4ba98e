"""The canonical job: what every API dialect translates its request into.

Why: generation is implemented once. A dialect validates its own request
shape, then builds a complete JobSpec (defaults filled, seed chosen, init
image already in S3) that the worker runs without consulting any dialect.
"""
from __future__ import annotations

import json

import orjson
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class LoraRef:
    """A LoRA file from the LoRA directory and the weight it is applied with."""

    name: str
    weight: float = 1.0


@dataclass
class JobSpec:
    """Everything a worker needs to produce a job's images; plain values only."""

    prompt: str
    model: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    negative_prompt: str | None = None
    num_images: int = 1
    strength: float | None = None
    scheduler: str | None = None
    output_format: str = "png"
    init_image_key: str | None = None
    loras: list[LoraRef] = field(default_factory=list)
    callback_url: str | None = None
    dialect: str = "native"

    @property
    def mode(self) -> str:
        """txt2img, or img2img when an init image was given."""
        return "img2img" if self.init_image_key else "txt2img"

    @property
    def seeds(self) -> list[int]:
        """One seed per image, consecutive as A1111 numbers them."""
        return [(self.seed + i) % 2**32 for i in range(self.num_images)]

    @property
    def extension(self) -> str:
        """File extension for the output format (jpeg is stored as .jpg)."""
        return {"jpeg": "jpg"}.get(self.output_format, self.output_format)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (faster than dataclasses.asdict: this runs on every submission)."""
        data = dict(vars(self))
        data["loras"] = [{"name": lr.name, "weight": lr.weight} for lr in self.loras]
        return data

    def to_json(self) -> str:
        return orjson.dumps(self.to_dict()).decode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["loras"] = [LoraRef(**lr) for lr in values.get("loras") or []]
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        return cls.from_dict(json.loads(text))
