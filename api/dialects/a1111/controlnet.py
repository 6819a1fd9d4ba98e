"""sd-webui-controlnet's request shape: `alwayson_scripts.controlnet.args` units, and its own routes.

Why its own module: the extension's ControlNetUnit (internal_controlnet/
external_code.py) has its own names, defaults and enum spellings (ints or
the UI's labels); this reads them into api/controlnet.py's UnitRequest, and
says which unit settings sdqueue does not run (fields.py screens them as it
screens every A1111 field). Pure functions of the request but for
`a1111_units`, which decodes the images (422s naming the unit's field).
"""
from __future__ import annotations

from typing import Any, Mapping

from flask_smorest import abort

from api.controlnet import A1111_NAMES, UnitRequest, nest
from api.init_image import InitImageError, decode_init_image
from common.controlnets import CANNY_HIGH, CANNY_LOW, PROCESSOR_RES

SCRIPT = "controlnet"
BALANCED, PROMPT_MORE, CONTROL_MORE = 0, 1, 2
CONTROL_MODES = {"Balanced": BALANCED, "My prompt is more important": PROMPT_MORE,
                 "ControlNet is more important": CONTROL_MORE}
RESIZE_MODES = {0: "just_resize", 1: "crop_and_resize", 2: "resize_and_fill",
                "Just Resize": "just_resize", "Crop and Resize": "crop_and_resize", "Resize and Fill": "resize_and_fill",
                "Scale to Fit (Inner Fit)": "crop_and_resize", "Envelope (Outer Fit)": "resize_and_fill"}
MODULE_ALIASES = {"None": "none", "": "none", "canny": "canny", "none": "none"}
ABSENT = (None, -1, "")     # the extension's "use the preprocessor's default"


def script_entry(data: Mapping[str, Any]) -> tuple[str, list] | None:
    """(the request's name of the ControlNet script, its args) when the request has it."""
    for name, value in (data.get("alwayson_scripts") or {}).items():
        if name.lower() == SCRIPT:
            args = value.get("args") if isinstance(value, dict) else value
            return name, args if isinstance(args, list) else []
    return None


def enabled_units(data: Mapping[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
    """(path, unit) of every unit that is on (the extension's `enabled` defaults to true)."""
    entry = script_entry(data)
    if entry is None:
        return []
    name, args = entry
    return [(("alwayson_scripts", name, "args", str(i)), unit) for i, unit in enumerate(args)
            if not (isinstance(unit, dict) and unit.get("enabled", True) is False)]


def control_mode(unit: Mapping[str, Any]) -> int | None:
    value = unit.get("control_mode", BALANCED)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value in (0, 1, 2) else None
    return CONTROL_MODES.get(value)


def unit_refusals(data: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """(path, why) for unit settings sdqueue does not run faithfully (a 422 unless the key is lenient)."""
    found = []
    units = enabled_units(data)
    modes = {control_mode(u) for _, u in units if isinstance(u, dict)}
    for path, unit in units:
        if not isinstance(unit, dict):
            found.append((path, "a positional ControlNet unit is not read; send the extension's ControlNetUnit "
                                "object (enabled, image, module, model, weight, ...)"))
            continue
        if control_mode(unit) == PROMPT_MORE:
            found.append(((*path, "control_mode"), "\"My prompt is more important\" is not run (diffusers has no "
                                                   "soft injection); Balanced and ControlNet is more important are"))
        elif control_mode(unit) == CONTROL_MORE and len(modes - {None}) > 1:
            found.append(((*path, "control_mode"), "ControlNet is more important (guess mode) applies to the whole "
                                                   "call: every unit of a request must agree"))
        if unit.get("pixel_perfect"):
            found.append(((*path, "pixel_perfect"), "pixel perfect is not run; set processor_res"))
        image = unit.get("image") if unit.get("image") is not None else unit.get("input_image")
        if unit.get("mask") or isinstance(image, dict) and image.get("mask"):
            found.append(((*path, "mask"), "a unit's own mask is not used (the request's mask inpaints)"))
    return found


def number(unit: Mapping[str, Any], name: str, default: float, path: tuple[str, ...]) -> float:
    value = unit.get(name, default)
    if value in ABSENT and name in ("processor_res", "threshold_a", "threshold_b"):
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        abort(422, errors={"json": nest((*path, name), "must be a number")})
    return float(value)


def a1111_units(data: Mapping[str, Any]) -> list[UnitRequest]:
    """The enabled units as UnitRequests, with the extension's defaults; images decoded (a 422 naming the field
    when one cannot be used). Settings fields.py refused (for a lenient key: warned) run as Balanced, without
    pixel perfect and without the unit's own mask; positional units are skipped."""
    units = []
    agreed = {control_mode(u) for _, u in enabled_units(data) if isinstance(u, dict)} == {CONTROL_MORE}
    for path, unit in enabled_units(data):
        if not isinstance(unit, dict):
            continue
        field = "image" if unit.get("image") is not None else "input_image"
        raw = unit.get(field)
        if isinstance(raw, dict):
            raw = raw.get("image")
        image = None
        if raw not in (None, ""):
            if not isinstance(raw, str):
                abort(422, errors={"json": nest((*path, field), "a base64 image (bare or a data URL)")})
            try:
                image = decode_init_image(raw)
            except InitImageError as exc:
                abort(422, errors={"json": nest((*path, field), str(exc))})
        mode = control_mode(unit)
        if mode is None:
            abort(422, errors={"json": nest((*path, "control_mode"), f"one of 0, 1, 2 or {', '.join(CONTROL_MODES)}")})
        resize = unit.get("resize_mode", "Crop and Resize")
        if isinstance(resize, bool) or resize not in RESIZE_MODES:
            abort(422, errors={"json": nest((*path, "resize_mode"),
                                            "one of 0, 1, 2 or Just Resize, Crop and Resize, Resize and Fill")})
        module = unit.get("module", "none")
        units.append(UnitRequest(
            model=str(unit.get("model") or "None"), image=image, where=path, names=A1111_NAMES,
            scale=number(unit, "weight", 1.0, path), start=number(unit, "guidance_start", 0.0, path),
            end=number(unit, "guidance_end", 1.0, path),
            preprocessor=MODULE_ALIASES.get(module, module) if isinstance(module, str) else repr(module),
            low=number(unit, "threshold_a", CANNY_LOW, path), high=number(unit, "threshold_b", CANNY_HIGH, path),
            processor_res=int(number(unit, "processor_res", PROCESSOR_RES, path)), resize_mode=RESIZE_MODES[resize],
            guess_mode=agreed))
    return units
