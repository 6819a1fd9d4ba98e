"""The /v1/draw API's request schema."""
from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, validate, validates

from api.schemas import BaseSchema, LooseInteger, SettingLength, SettingRange, limit
from api.services import services


RATIOS = {"16:9": (16, 9), "1:1": (1, 1), "9:16": (9, 16), "3:4": (3, 4), "4:3": (4, 3)}


class DrawRequest(BaseSchema):
    """POST /v1/draw: a prompt, an aspect ratio and how many images."""

    prompt = fields.String(required=True, validate=SettingLength(min=1, max=limit("max_prompt_chars")),
                           metadata={"example": "cat"})
    size = fields.String(load_default="1:1", validate=validate.OneOf(list(RATIOS)),
                         metadata={"description": "Aspect ratio: " + ", ".join(RATIOS)})
    quantity = LooseInteger(load_default=1, validate=SettingRange(1, limit("max_images")))
    model = fields.String(load_default=None, allow_none=True, metadata={"description": "Model name; default: the service's"})

    @validates("model")
    def known(self, value: str | None, **_: Any) -> None:
        if value is not None and services().catalog.model(value) is None:
            raise ValidationError(f"unknown model '{value}'")


# An instance, not a class: webargs would build (and deep-copy) a schema per request.
DRAW_REQUEST = DrawRequest()
