"""A1111 sampler and schedule-type names -> diffusers scheduler class + config.

Why in common (names only, no diffusers import): the A1111-style dialects
validate and list these names in the API; the worker builds the scheduler
from the class name and config overrides carried in the JobSpec. The mapping
follows diffusers' "A1111 / k-diffusion -> diffusers" scheduler table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.families import BETA, FLOW

KARRAS_SUFFIX = " Karras"


@dataclass(frozen=True)
class Sampler:
    """An A1111 sampler as diffusers runs it."""

    name: str
    scheduler: str
    config: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    karras: bool = True   # whether a Karras sigma schedule applies to this class


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", aliases=("k_dpmpp_2m",)),
    Sampler("DPM++ SDE", "DPMSolverSDEScheduler", aliases=("k_dpmpp_sde",)),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"},
            aliases=("k_dpmpp_2m_sde",)),
    Sampler("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, aliases=("k_dpmpp_2m_sde_heun",)),
    Sampler("DPM++ 2S a", "DPMSolverSinglestepScheduler", aliases=("k_dpmpp_2s_a",)),
    Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
            aliases=("k_dpmpp_3m_sde",)),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "k_euler_ancestral"), karras=False),
    Sampler("Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    Sampler("LMS", "LMSDiscreteScheduler", aliases=("k_lms",)),
    Sampler("Heun", "HeunDiscreteScheduler", aliases=("k_heun",)),
    Sampler("DPM2", "KDPM2DiscreteScheduler", aliases=("k_dpm_2",)),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", aliases=("k_dpm_2_a",)),
    Sampler("DDIM", "DDIMScheduler", aliases=("ddim",), karras=False),
    Sampler("PLMS", "PNDMScheduler", aliases=("plms",), karras=False),
    Sampler("UniPC", "UniPCMultistepScheduler", aliases=("unipc",), karras=False),
    Sampler("LCM", "LCMScheduler", aliases=("k_lcm",), karras=False),
)

# Samplers of flow-matching models (SD3, Flux), as Forge and ComfyUI name them: "Euler" is the flow-matching Euler.
FLOW_SAMPLERS: tuple[Sampler, ...] = (
    Sampler("Euler", "FlowMatchEulerDiscreteScheduler", aliases=("k_euler", "euler")),
    Sampler("Heun", "FlowMatchHeunDiscreteScheduler", aliases=("k_heun", "heun"), karras=False),
)
FLOW_FALLBACK = "Euler"

# A1111 1.9+ "Schedule type" (the `scheduler` field): label -> config overrides
SCHEDULE_TYPES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Uniform": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
    "Beta": {"use_beta_sigmas": True},
}
FLOW_SCHEDULE_TYPES = ("Automatic", "Uniform", "Karras", "Exponential", "Beta")   # sigma schedules FlowMatchEuler has
SCHEDULE_ALIASES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras",
                    "exponential": "Exponential", "sgm_uniform": "SGM Uniform", "beta": "Beta"}


def _index(samplers: tuple[Sampler, ...]) -> dict[str, Sampler]:
    table: dict[str, Sampler] = {}
    for s in samplers:
        for name in (s.name, *s.aliases):
            table[name.lower()] = s
    return table


_BY_NAME = {BETA: _index(SAMPLERS), FLOW: _index(FLOW_SAMPLERS)}


def samplers_for(schedule: str) -> tuple[Sampler, ...]:
    """The samplers that run models of `schedule` (BETA or FLOW)."""
    return FLOW_SAMPLERS if schedule == FLOW else SAMPLERS


def find_sampler(name: str, schedule: str = BETA) -> tuple[Sampler, bool] | None:
    """The sampler called `name` (A1111 name or alias, any case) for models of `schedule`,
    and whether " Karras" was asked for."""
    table = _BY_NAME[schedule]
    key = name.strip().lower()
    if key in table:
        return table[key], False
    if key.endswith(KARRAS_SUFFIX.lower()):
        base = table.get(key[: -len(KARRAS_SUFFIX)])
        if base is not None and base.karras:
            return base, True
    return None


def is_known_sampler(name: str) -> bool:
    """Whether `name` is a sampler of any model kind."""
    return any(find_sampler(name, schedule) for schedule in (BETA, FLOW))


def find_schedule_type(name: str) -> str | None:
    """The schedule-type label for an A1111 `scheduler` value (label or alias), or None."""
    if name in SCHEDULE_TYPES:
        return name
    return SCHEDULE_ALIASES.get(name.strip().lower())


def scheduler_for(sampler_name: str, schedule_type: str | None,
                  schedule: str = BETA) -> tuple[str, dict[str, Any], str]:
    """(diffusers class, config overrides, the label A1111 writes) for a validated sampler + schedule type."""
    sampler, karras = find_sampler(sampler_name, schedule)  # type: ignore[misc]
    config = dict(sampler.config)
    label = schedule_type or ("Karras" if karras else None)
    if label:
        config.update(SCHEDULE_TYPES[label])
    return sampler.scheduler, config, sampler.name
