"""SD on EKS's translation: a validated body -> the canonical JobSpec, written where the original writes.

Why: the job's images go to s3://{bucket}/{save_dir}/{id_task}/ with the
original's response-<uuid>.out JSON beside them; the client's id_task is an
idempotency key (the task id is derived from the key and id_task).
"""
from __future__ import annotations

import hashlib
import uuid

from api.auth import current_key
from api.dialects.a1111 import build_a1111_jobspec, echo_parameters, unhonoured
from api.dialects.eks.schemas import TASKS, links_of
from api.downloads import fetch_link
from api.init_image import InitImage, image_from_bytes
from api.services import Services
from common.catalog import ModelInfo
from common.jobspec import JobSpec


DIALECT = "eks"


def eks_task_id(owner: str, id_task: str) -> str:
    return "eks-" + hashlib.sha256(f"{owner}\0{id_task}".encode()).hexdigest()[:32]


def output_location(scripts: dict) -> str:
    """{save_dir}/{id_task}: where the job's images and its .out file go in the bucket."""
    return f"{scripts['save_dir'].strip('/')}/{scripts['id_task']}"


def fetch_images(svc: Services, image_link: str, warnings: list[str]) -> list[InitImage]:
    """The init image: the first of the comma-separated image_link URLs, fetched and checked."""
    links = links_of(image_link)
    if len(links) > 1:
        warnings.append(f"image_link: only the first of {len(links)} links is used")

    def may_read(metadata: dict[str, str]) -> bool:
        task_id = metadata.get("task-id")
        return not task_id or svc.store.owner_of(task_id) == current_key().owner

    return [image_from_bytes(fetch_link(links[0], svc.settings, svc.storage, may_read))]


def build_eks_jobspec(svc: Services, data: dict, model: ModelInfo, task_id: str, fetched: list[str]) -> JobSpec:
    """The body (validated, images fetched) -> the canonical job, with its output location and sidecar."""
    scripts = data["alwayson_scripts"]
    id_task, mode, location = str(scripts["id_task"]), TASKS[scripts["task"]], output_location(scripts)
    data["alwayson_scripts"] = {}
    warnings = unhonoured(data, mode) + fetched
    spec = build_a1111_jobspec(svc, data, mode, task_id, warnings, model=model, dialect=DIALECT)
    spec.output_prefix = location
    spec.sidecar_key = f"{location}/response-{uuid.uuid4()}.out"
    spec.meta = {"id_task": id_task, "uid": scripts["uid"], "warnings": warnings, "sidecar_style": "eks-response",
                 "sidecar": {"id_task": id_task, "parameters": echo_parameters(data)}}
    return spec
