"""Model families: the seam where SD 1.x/2.x (and later SDXL, SD3, Flux) differ.

Why: the registry and the generation loop are family-independent; they ask
`family_for(model)` how to load a model and `family_of(pipe)` how to build
its views and call arguments. Adding a family is one new module in this
package (see base.Family) and one line in FAMILIES.

No torch or diffusers at import (families import them inside methods).
"""
from __future__ import annotations

from typing import Any

from common.catalog import ModelInfo
from worker.pipelines import sd
from worker.pipelines.base import Family

# Most specific first: the first family that matches wins. sd is the catch-all and stays last.
FAMILIES: tuple[Family, ...] = (
    sd.FAMILY,
)


def family_for(model: ModelInfo) -> Family:
    """The family that loads `model`."""
    return next(f for f in FAMILIES if f.matches(model))


def family_of(pipe: Any) -> Family:
    """The family a loaded pipeline belongs to."""
    return next(f for f in FAMILIES if f.owns(pipe))


__all__ = ["FAMILIES", "Family", "family_for", "family_of"]
