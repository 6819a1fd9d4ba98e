"""Scheduler names the service accepts, and which noise schedule each runs (names only: no diffusers import).

Why here: the API validates and documents these names, and refuses one that
cannot run the request's model (a beta-schedule scheduler rebuilt from a
flow-matching model's config breaks the job inside diffusers); the worker
maps them to the diffusers classes of the same name.
"""
from common.families import BETA, FLOW

SCHEDULERS: dict[str, str] = {
    "DPMSolverMultistepScheduler": "DPM multistep solver: good quality, fast (recommended).",
    "DDIMScheduler": "DDIM: stable, slower.",
    "EulerDiscreteScheduler": "Euler discrete: fast.",
    "EulerAncestralDiscreteScheduler": "Euler ancestral: fast, more random.",
    "PNDMScheduler": "PNDM: the classic SD 1.x default.",
    "LMSDiscreteScheduler": "LMS linear multistep.",
    "HeunDiscreteScheduler": "Heun discrete (second order: two model calls per step).",
    "KDPM2DiscreteScheduler": "KDPM2 discrete (second order).",
    "KDPM2AncestralDiscreteScheduler": "KDPM2 ancestral (second order).",
    "FlowMatchEulerDiscreteScheduler": "Flow-matching Euler: the SD3 and Flux default (flow models only).",
    "FlowMatchHeunDiscreteScheduler": "Flow-matching Heun, second order (SD3 and Flux only).",
}
FLOW_SCHEDULERS = frozenset({"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"})


def schedule_of(name: str) -> str:
    """BETA or FLOW: the kind of model a scheduler class can run."""
    return FLOW if name in FLOW_SCHEDULERS else BETA


def schedulers_for(schedule: str) -> list[str]:
    """The scheduler names that run models of `schedule`."""
    return [name for name in SCHEDULERS if schedule_of(name) == schedule]
