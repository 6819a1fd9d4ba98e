"""What every dialect's schemas are built from: the base schema, lenient field types, bounds from settings.

Why bounds read at use: a schema is declared once, at module level, next to
the routes it validates; its limits (sizes, steps, images, prompt length)
are the running service's settings, read when a request is validated and
when the OpenAPI document is built, so the document shows the bounds that
are enforced. Unknown fields are ignored (as the original services do).
"""
from __future__ import annotations

import numbers

import orjson
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, pre_load, validate

from api.init_image import InitImageError, decode_init_image
from api.services import services

MAX_SEED = 2**32 - 1


class Setting:
    """A bound read from the running service's settings when used: `Setting("limits.max_images")`."""

    def __init__(self, path: str, plus: int = 0):
        self.path = path.split(".")
        self.plus = plus
        self._cached: tuple[Any, Any] = (None, None)   # (settings object, value): one tuple, swapped atomically

    def value(self) -> Any:
        settings = services().settings
        cached = self._cached
        if cached[0] is settings:      # the submission hot path reads each bound several times per request
            return cached[1]
        node = settings
        for part in self.path:
            node = getattr(node, part)
        self._cached = (settings, node + self.plus)
        return node + self.plus


def _resolved(bound: Any) -> Any:
    return bound.value() if isinstance(bound, Setting) else bound


class _SettingBounds:
    """`min` / `max` that may be Settings; marshmallow's checks and apispec's document read them the same way."""

    _bounds: tuple[Any, Any] = (None, None)

    @property
    def min(self) -> Any:
        return _resolved(self._bounds[0])

    @min.setter
    def min(self, bound: Any) -> None:
        self._bounds = (bound, self._bounds[1])

    @property
    def max(self) -> Any:
        return _resolved(self._bounds[1])

    @max.setter
    def max(self, bound: Any) -> None:
        self._bounds = (self._bounds[0], bound)


class JsonSize(validate.Validator):
    """A free-form value (a dict or list a client may fill with anything) is at most
    `limits.max_extra_bytes` once serialised: such values are stored with the job (echoed parameters)."""

    def __call__(self, value: Any) -> Any:
        import orjson

        most = services().settings.limits.max_extra_bytes
        try:
            size = len(orjson.dumps(value))
        except TypeError:
            raise ValidationError("must be plain JSON") from None
        if size > most:
            raise ValidationError(f"is {size} bytes as JSON; at most {most} (limits.max_extra_bytes)")
        return value


class SettingRange(_SettingBounds, validate.Range):
    """validate.Range whose bounds may be Settings."""


class SettingLength(_SettingBounds, validate.Length):
    """validate.Length whose bounds may be Settings."""


def limit(name: str, plus: int = 0) -> Setting:
    """A bound from the `limits.*` settings."""
    return Setting(f"limits.{name}", plus)


class LooseInteger(fields.Integer):
    """An integer that also accepts integral floats and numeric strings (as pydantic does), never bools."""

    def _deserialize(self, value: Any, attr, data, **kwargs):
        if isinstance(value, bool):
            raise self.make_error("invalid")
        if isinstance(value, float) and not value.is_integer():
            raise ValidationError("value is not a valid integer")
        if isinstance(value, str):
            value = value.strip()
        return super()._deserialize(value, attr, data, **kwargs)


class StrictFloat(fields.Float):
    """A float that refuses bools (True is not a guidance scale)."""

    def _deserialize(self, value: Any, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (numbers.Number, str)):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class InitImageField(fields.String):
    """A base64 image (data URL) decoded and checked on load."""

    def _deserialize(self, value: Any, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return decode_init_image(text)
        except InitImageError as exc:
            raise ValidationError(str(exc)) from exc


def unencodable_text(value: Any) -> Any:
    """marshmallow-shaped errors for strings that are not valid Unicode (lone surrogates), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return ["text must be valid Unicode (it contains a lone surrogate)"]
        return None
    if isinstance(value, dict):
        errors = {k: e for k, v in value.items() if isinstance(k, str) and (e := unencodable_text(v))}
        return errors or None
    if isinstance(value, list):
        errors = {i: e for i, v in enumerate(value) if (e := unencodable_text(v))}
        return errors or None
    return None


class BaseSchema(Schema):
    """Ignores unknown fields; refuses text that could not be stored or echoed back."""

    class Meta:
        unknown = EXCLUDE

    @pre_load
    def refuse_unencodable_text(self, data: Any, **_: Any) -> Any:
        try:
            orjson.dumps(data)          # C-speed check: fails only on lone surrogates (or odd types)
        except TypeError:
            errors = unencodable_text(data)
            if errors:
                raise ValidationError(errors) from None
        return data


def json_body(description: str, *schemas: Schema) -> dict:
    """An OpenAPI requestBody for views that pick their schema from the body themselves (one schema, or any of
    several), so the document still says what they take."""
    schema: Any = schemas[0] if len(schemas) == 1 else {"anyOf": list(schemas)}
    return {"description": description, "required": True, "content": {"application/json": {"schema": schema}}}


def multiple_of_8(value: int | None) -> None:
    if value is not None and value % 8:
        raise ValidationError("must be a multiple of 8")


class WorkerSchema(Schema):
    name = fields.String()
    device = fields.String()
    state = fields.String(metadata={"description": "starting, ready, busy or setup_failed"})
    busy = fields.Boolean()
    models = fields.List(fields.String(), metadata={"description": "Models held warm, least recently used first"})
    families = fields.Dict(keys=fields.String(), values=fields.String(allow_none=True), metadata={
        "description": "Model family of each warm model: sd1, sd2, sdxl, sdxl-refiner, sd3 or flux"})
    model_loads = fields.Integer(metadata={"description": "Models this worker process has loaded since it started"})
    dtype = fields.String(metadata={"description": "Precision of its default model's warm weights (worker.dtype; auto "
                                                   "is per family): float16, bfloat16 or float32; empty for the "
                                                   "webhook worker"})
    max_batch = fields.Integer(metadata={"description": "Images one pipeline call may hold (worker.max_batch): "
                                                        "compatible waiting jobs run together"})
    compiled = fields.Boolean(metadata={"description": "The denoiser (UNet, or SD3/Flux transformer) runs torch.compile'd (worker.compile)"})
    speedups = fields.List(fields.String(), metadata={
        "description": "Speed-ups in force: sdpa, channels_last, fuse_qkv, tf32, compile"})
    queues = fields.List(fields.String())
    error = fields.String(allow_none=True, metadata={"description": "Why a worker is setup_failed"})
    last_seen = fields.String()


class HealthSchema(Schema):
    status = fields.String(metadata={"example": "ok"})
    model_loaded = fields.Boolean()
    workers = fields.List(fields.Nested(WorkerSchema))
