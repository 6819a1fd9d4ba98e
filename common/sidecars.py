"""JSON documents some dialects promise next to a job's images, in their original shapes.

Why here: the worker writes them when the job ends (success or not), so
they exist as soon as the status says so, whoever polls; each dialect only
names the style and the static part when it submits the job.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from common.infotext import generation_info
from common.jobspec import JobSpec


def aws_params(static: dict, spec: JobSpec, task_id: str, seeds: list[int], urls: list[str],
               error: str | None) -> dict[str, Any]:
    """The AWS extension's {job}_param.json: the request, A1111's info (a JSON string), the endpoint."""
    info = {**generation_info(spec, seeds), "task_id": task_id, "warnings": spec.meta.get("warnings") or []}
    return {**static, "info": json.dumps(info, ensure_ascii=False), "images": urls, "error": error or ""}


def eks_response(static: dict, spec: JobSpec, task_id: str, seeds: list[int], urls: list[str],
                 error: str | None) -> dict[str, Any]:
    """SD on EKS's response-<uuid>.out: A1111's echo with the outputs and status added (written on failure too)."""
    parameters = {**static.get("parameters", {}), "id_task": static.get("id_task"), "status": 0 if error else 1,
                  "image_url": ",".join(urls), "image_seed": ",".join(str(s) for s in seeds) if not error else [],
                  "error_msg": error or "", "image_mask_url": ""}
    if error:
        parameters["reason"] = None
    warnings = spec.meta.get("warnings")      # what a lenient key's job ran without (absent when none)
    return {"images": [""], "info": "", "parameters": parameters, **({"warnings": warnings} if warnings else {})}


STYLES: dict[str, Callable[..., dict[str, Any]]] = {"aws-params": aws_params, "eks-response": eks_response}


def build_sidecar(spec: JobSpec, task_id: str, seeds: list[int], urls: list[str], error: str | None) -> dict[str, Any]:
    style = STYLES[spec.meta.get("sidecar_style", "aws-params")]
    return style(spec.meta.get("sidecar", {}), spec, task_id, seeds, urls, error)
