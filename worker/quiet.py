"""Silence the ML libraries' progress bars and advisory warnings.

Why: a worker's log should hold one line per job event, not tqdm bars and
hub hints for every request.
"""
import os
import warnings


def quiet_libraries() -> None:
    """Turn down transformers/diffusers logging and progress bars."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as dlogging
    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    from transformers.utils import logging as tlogging
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()
    for lib in (dlogging, tlogging):   # their own stderr handler off: what they log goes through ours (JSON)
        lib.disable_default_handler()
        lib.enable_propagation()
