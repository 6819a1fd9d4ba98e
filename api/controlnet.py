"""ControlNet units of a request -> JobSpec.controlnet, for every dialect: checked, control images stored.

Why at the API: an unknown ControlNet or preprocessor, a ControlNet of
another model generation, or a broken control image is the client's mistake
and must be a 422 naming the field before anything is queued. Control images
are checked as init images are (pixel cap from the header before decoding,
api/init_image.py) and stored under the task's own input prefix, owner-scoped
as init images are: a request can only send images, never name a stored one.
Preprocessing (canny) and fitting to the output size run at the worker
(worker/controlnet.py), which has numpy and knows an inpainting job's region.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from flask_smorest import abort

from api.init_image import InitImage
from api.services import Services
from common.catalog import ModelInfo
from common.controlnets import (CANNY_HIGH, CANNY_LOW, MAX_UNITS, PREPROCESSORS, PROCESSOR_RES, find_controlnet,
                                fit_problem, list_controlnets)
from common.storage import task_metadata

NATIVE_NAMES = {"model": "model", "image": "image", "scale": "scale", "start": "start", "end": "end",
                "preprocessor": "preprocessor", "processor_res": "processor_res"}
A1111_NAMES = {"model": "model", "image": "image", "scale": "weight", "start": "guidance_start",
               "end": "guidance_end", "preprocessor": "module", "processor_res": "processor_res"}


@dataclass
class UnitRequest:
    """One ControlNet unit as a dialect read it; `where` is its path in the request (for 422s) and `names` the
    dialect's names of its fields."""

    model: str
    image: InitImage | None
    where: tuple[str, ...]
    names: Mapping[str, str]
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocessor: str = "none"
    low: float = CANNY_LOW
    high: float = CANNY_HIGH
    processor_res: int = PROCESSOR_RES
    resize_mode: str = "crop_and_resize"
    guess_mode: bool = False


def nest(path: tuple[str, ...], message: str) -> dict[str, Any]:
    """`message` for the field at `path`, nested as marshmallow's messages ({"a": {"0": {"b": [message]}}})."""
    errors: dict[str, Any] = {}
    node = errors
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = [message]
    return errors


def refuse(path: tuple[str, ...], message: str) -> None:
    """A 422 naming the field at `path`."""
    abort(422, errors={"json": nest(path, message)})


def plan_controlnet(svc: Services, units: list[UnitRequest], model: ModelInfo, task_id: str, has_init: bool,
                    max_size: int | None = None) -> list[dict[str, Any]] | None:
    """JobSpec.controlnet for the units (None without any): each model found and fitting `model`, each
    preprocessor one sdqueue runs, each image stored (a unit without one uses the init image, as the
    extension does in img2img)."""
    if not units:
        return None
    if len(units) > MAX_UNITS:
        refuse(units[MAX_UNITS].where, f"at most {MAX_UNITS} ControlNet units per request")
    available = list_controlnets(svc.settings.controlnet_dir)
    planned = []
    for index, unit in enumerate(units):
        def at(name: str) -> tuple[str, ...]:
            return (*unit.where, unit.names.get(name, name))

        info = find_controlnet(available, unit.model) if unit.model and unit.model != "None" else None
        if info is None:
            refuse(at("model"), f"ControlNet model {unit.model!r} not found; see GET /controlnet/model_list "
                                f"(or GET /api/v1/models)")
        problem = fit_problem(info, model)
        if problem:
            refuse(at("model"), problem)
        if unit.preprocessor not in PREPROCESSORS:
            refuse(at("preprocessor"), f"preprocessor {unit.preprocessor!r} is not run by sdqueue; use one of "
                                       f"{', '.join(PREPROCESSORS)} (GET /controlnet/module_list)")
        if not 0 <= unit.start < unit.end <= 1:
            refuse(at("end" if unit.start < 1 else "start"),
                   f"the guidance window {unit.start}..{unit.end} must satisfy 0 <= start < end <= 1")
        if not 0 <= unit.scale <= 5:
            refuse(at("scale"), "must be within 0..5")
        if not 64 <= unit.processor_res <= (max_size or svc.settings.limits.max_size):
            refuse(at("processor_res"), f"must be within 64..{max_size or svc.settings.limits.max_size}")
        if unit.preprocessor == "canny" and not 0 <= unit.low <= unit.high:
            refuse((*unit.where, "threshold_a" if unit.names is A1111_NAMES else "low_threshold"),
                   "canny thresholds must satisfy 0 <= low <= high")
        key = None
        if unit.image is not None:
            key = svc.storage.input_key(task_id, f"control{index}.{unit.image.format}")
            svc.storage.put(key, unit.image.data, unit.image.content_type, metadata=task_metadata(task_id))
        elif not has_init:
            refuse(at("image"), "a ControlNet unit needs an image (img2img units without one use the init image)")
        planned.append({"model": info.name, "image_key": key, "scale": unit.scale, "start": unit.start,
                        "end": unit.end, "preprocessor": unit.preprocessor, "low": unit.low, "high": unit.high,
                        "processor_res": unit.processor_res, "resize_mode": unit.resize_mode,
                        "guess_mode": unit.guess_mode})
    return planned


def controlnet_list(svc: Services, model: ModelInfo | None = None) -> list[dict[str, Any]]:
    """The ControlNets in the ControlNet directory (those fitting `model` when given)."""
    found = list_controlnets(svc.settings.controlnet_dir).values()
    return [c.to_dict() for c in found if model is None or fit_problem(c, model) is None]
