"""Pin this worker process to one device before torch is imported.

Why: one worker process per GPU. Setting CUDA_VISIBLE_DEVICES before torch
loads makes the chosen card the only one the process can touch (cuda:0 from
inside), so a job can never land on a neighbour's GPU.
"""
from __future__ import annotations

import os


def pin_device(configured: str, environ: dict | None = None) -> str:
    """Return the torch device string to use; call before importing torch.

    `cuda:N` hides every other card; `cuda`/empty respects an existing
    CUDA_VISIBLE_DEVICES (set by compose or Kubernetes); `cpu` hides all GPUs.
    """
    env = os.environ if environ is None else environ
    configured = (configured or "").strip().lower()
    if configured == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    if configured.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = configured.split(":", 1)[1]
        return "cuda:0"
    return "cuda" if configured == "cuda" else ""


def resolve_device(pinned: str) -> str:
    """After import: an empty choice means cuda:0 if a GPU is visible, else cpu."""
    import torch

    if pinned in ("cuda", "cuda:0"):
        if not torch.cuda.is_available():
            raise RuntimeError("worker.device asks for CUDA but no GPU is visible")
        return "cuda:0"
    if pinned == "cpu":
        return "cpu"
    return "cuda:0" if torch.cuda.is_available() else "cpu"
