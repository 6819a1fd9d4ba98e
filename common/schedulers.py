"""Scheduler names the service accepts (names only: the API imports no diffusers).

Why here: the API validates and documents these names; the worker maps them
to diffusers classes of the same name.
"""

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
}
