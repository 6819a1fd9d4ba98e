"""SD on EKS's translation: a validated body -> the canonical JobSpec, written where the original writes.

Why: the job's images go to s3://{bucket}/{save_dir}/{owner}/{id_task}/ with
the original's response-<uuid>.out JSON beside them; the client's id_task is
an idempotency key per API key (the task id is derived from the key and
id_task), and the owner id in the folder keeps two keys' jobs of the same
id_task (or a chosen save_dir) from ever writing the same object.
"""
from __future__ import annotations

import hashlib
import uuid

from api.auth import current_key
from api.dialects.a1111 import Refusal, build_a1111_jobspec, echo_parameters, screen_fields
from api.dialects.eks.schemas import ENVELOPE, TASKS, links_of
from api.downloads import fetch_link
from api.init_image import InitImage, image_from_bytes
from api.services import Services
from common.catalog import ModelInfo
from common.errors import TaskNotFound
from common.jobspec import JobSpec
from common.storage import OWNER_META, TASK_ID_META


DIALECT = "eks"


def eks_task_id(owner: str, id_task: str) -> str:
    return "eks-" + hashlib.sha256(f"{owner}\0{id_task}".encode()).hexdigest()[:32]


def output_location(scripts: dict, owner: str) -> str:
    """{save_dir}/{owner}/{id_task}: where the job's images and its .out file go in the bucket.

    The owner id (`k_` and 20 hex digits, see api/auth.py) sits right above
    id_task (which has no '/'), so the folders of two keys differ whatever
    save_dir and id_task each chooses, and none is a task id of the other
    dialects' folders ({storage.prefix}/{task_id}, {aws.output_prefix}/{job}).
    """
    return f"{scripts['save_dir'].strip('/')}/{owner}/{scripts['id_task']}"


def earlier_location(svc: Services, task_id: str, owner: str) -> str | None:
    """Where this key's job of the same id_task writes, if it has one: a resubmission answers that folder
    (whatever save_dir it now sends), so output_location always says where the images are."""
    try:
        return svc.store.get_owned(task_id, owner).spec.output_prefix
    except TaskNotFound:
        return None


def readable_by(svc: Services, owner: str, metadata: dict[str, str]) -> bool:
    """Whether `owner` may read a bucket object with this user metadata (an s3:// image_link).

    A task's files (images, init images, side files) are their task owner's, an
    uploaded checkpoint's files their uploader's; a file that names no owner
    was put there by the operator and is readable by every key. Anything else
    answers as a missing object.
    """
    task_id = metadata.get(TASK_ID_META)
    if task_id:
        return svc.store.owner_of(task_id) == owner
    return metadata.get(OWNER_META, owner) == owner


def screen_eks(svc: Services, data: dict) -> list[str]:
    """The body's A1111 fields and the alwayson scripts beside the envelope, screened as the A1111 API screens
    them (a 422-turned-400 naming each value sdqueue would not run, or warnings for a lenient key); several
    image_link URLs too, since a job has one init image."""
    scripts = data["alwayson_scripts"]
    mode = TASKS[scripts["task"]]
    view = {**data, "alwayson_scripts": {k: v for k, v in scripts.items() if k not in ENVELOPE}}
    links = links_of(scripts.get("image_link")) if mode == "img2img" else []
    extra = [Refusal(("alwayson_scripts", "image_link"), f"a job has one init image; {len(links)} links were given "
                                                          "(the first is used)")] if len(links) > 1 else []
    return screen_fields(svc, view, mode, extra)


def fetch_images(svc: Services, image_link: str) -> list[InitImage]:
    """The init image: the first of the comma-separated image_link URLs, fetched and checked."""
    links = links_of(image_link)
    owner = current_key().owner
    return [image_from_bytes(fetch_link(links[0], svc.settings, svc.storage,
                                        lambda metadata: readable_by(svc, owner, metadata)))]


def build_eks_jobspec(svc: Services, data: dict, model: ModelInfo, task_id: str, warnings: list[str],
                      location: str) -> JobSpec:
    """The body (validated, screened, images fetched) -> the canonical job, written at `location`
    (output_location's) with its sidecar."""
    scripts = data["alwayson_scripts"]
    id_task, mode = str(scripts["id_task"]), TASKS[scripts["task"]]
    data["alwayson_scripts"] = {k: v for k, v in scripts.items() if k not in ENVELOPE}   # ControlNet units stay
    spec = build_a1111_jobspec(svc, data, mode, task_id, warnings, model=model, dialect=DIALECT)
    spec.output_prefix = location
    spec.sidecar_key = f"{location}/response-{uuid.uuid4()}.out"
    spec.meta = {"id_task": id_task, "uid": scripts["uid"], "warnings": warnings, "sidecar_style": "eks-response",
                 "sidecar": {"id_task": id_task, "parameters": echo_parameters(data)}}
    return spec
