"""Model families: the seam where SD 1.x/2.x, SDXL (and its refiner), SD3 and Flux differ.

Why: the registry and the generation loop are family-independent; they ask
`family_for(model)` how to load a model and `family_of(pipe)` how to build
its views and call arguments. Adding a family is one new module in this
package (see base.DiffusersFamily), its profile in common/families.py, and
one line in FAMILIES.

No torch or diffusers at import (families import them inside methods).
"""
from __future__ import annotations

from typing import Any

from common.catalog import ModelInfo
from worker.pipelines import flux, sd, sd3, sdxl
from worker.pipelines.base import Family

# The SDXL base comes before its refiner: both are StableDiffusionXLImg2ImgPipeline once in img2img mode.
FAMILIES: tuple[Family, ...] = (sd.FAMILY, sdxl.FAMILY, sdxl.REFINER, sd3.FAMILY, flux.FAMILY)


def family_for(model: ModelInfo) -> Family:
    """The family that loads `model` (by the family the catalog read from its files)."""
    found = next((f for f in FAMILIES if f.matches(model)), None)
    if found is None:
        raise LookupError(f"no model family serves {model.name} ({model.family})")
    return found


def family_of(pipe: Any) -> Family:
    """The family a loaded pipeline belongs to."""
    found = next((f for f in FAMILIES if f.owns(pipe)), None)
    if found is None:
        raise LookupError(f"no model family runs {type(pipe).__name__}")
    return found


__all__ = ["FAMILIES", "Family", "family_for", "family_of"]
