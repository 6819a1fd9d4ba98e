"""The AWS SD extension API's translation: /inference/v2 -> the canonical JobSpec, tasks, pools and
checkpoints -> the extension's views.

Why: /inference/v2 carries A1111 parameters plus the extension's envelope; the
job runs on the queue of the worker pool its `sagemaker_endpoint_name` names,
with the images written where the extension puts them
(out/{job}/result/image_{n}.jpg) and the params JSON beside them.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

from api.dialects.a1111 import build_a1111_jobspec, echo_parameters, find_checkpoint
from api.dialects.aws.errors import DIALECT
from api.services import Services
from api.uploads import uploaded_asset, uploaded_model
from common.catalog import ModelInfo
from common.jobspec import JobSpec, LoraRef
from common.store import CheckpointStore, PoolRecord, Task, TaskStatus
from common.store.checkpoints import Checkpoint

# The extension's inference template for SD 1.x/2.x models (28 steps, Euler a); other families get their own.
TEMPLATE_DEFAULTS = {"steps": 28, "cfg_scale": 7.0, "sampler": "Euler a"}


STATUS_NAMES = {TaskStatus.PENDING: "inprogress", TaskStatus.PROCESSING: "inprogress",
                TaskStatus.COMPLETED: "succeed", TaskStatus.FAILED: "failed", TaskStatus.CANCELLED: "failed"}


def aws_time(epoch: float | None) -> str | None:
    """`str(datetime.now())` as the extension writes startTime/endTime (UTC)."""
    return None if epoch is None else datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def complete_time(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d-%H-%M-%S")


def output_prefix(svc: Services, job_id: str) -> str:
    return f"{svc.settings.aws.output_prefix.strip('/')}/{job_id}/result"


def params_key(svc: Services, job_id: str) -> str:
    return f"{output_prefix(svc, job_id)}/{job_id}_param.json"


def job_view(task: Task) -> dict:
    """A job as get-inference-job shows it; completion fields once it has ended."""
    spec = task.spec
    view = {"InferenceJobId": task.id, "startTime": aws_time(task.created_at), "status": STATUS_NAMES[task.status],
            "taskType": spec.meta.get("task_type", spec.mode), "endpoint": task.queue, "checkpoint": spec.model}
    if task.status.terminal:
        view.update({"completeTime": complete_time(task.finished_at or task.updated_at),
                     "image_names": [key.rsplit("/", 1)[-1] for key in task.result_keys],
                     "inference_info_name": spec.sidecar_key, "sagemakerRaw": ""})
    if task.error:
        view["error"] = task.error
    if spec.meta.get("warnings"):
        view["warnings"] = spec.meta["warnings"]
    return view


def resolve_model(svc: Services, store: CheckpointStore, name: str, owner: str) -> tuple[ModelInfo, list[dict]]:
    """A model in the model directory, else an Active checkpoint `owner` uploaded (fetched by the worker)."""
    model = find_checkpoint(svc, name)
    if model is not None:
        return model, []
    asset = uploaded_asset(store, "Stable-diffusion", name, owner)
    return uploaded_model(svc, asset), [asset]


def resolve_loras(svc: Services, store: CheckpointStore, names: list[str],
                  owner: str) -> tuple[dict[str, str], list[dict]]:
    """LoRAs usable in the prompt's <lora:name:weight> tags (tag name -> local name) and the files to fetch:
    the LoRA directory's, else `owner`'s Active uploads."""
    local = svc.catalog.loras()
    usable, assets = {}, []
    for name in names:
        stem = name.rsplit(".", 1)[0] if "." in name else name
        if stem in local:
            usable[stem] = stem
            continue
        asset = uploaded_asset(store, "Lora", name, owner)
        usable[stem] = asset["name"].rsplit(".", 1)[0]
        assets.append(asset)
    return usable, assets


def build_inference_jobspec(svc: Services, data: dict, job_id: str, model: ModelInfo, assets: list[dict],
                            loras: dict[str, str], warnings: list[str]) -> JobSpec:
    """A validated /inference/v2 body -> the canonical job on its pool, written where the extension writes.

    `assets`: the uploaded files the worker fetches first; `loras`: prompt tag name -> local LoRA name.
    """
    pool, mode = data["sagemaker_endpoint_name"], data["task_type"]
    spec = build_a1111_jobspec(svc, data, mode, job_id, warnings, model=model, dialect=DIALECT,
                               extra_loras=frozenset(loras), classic_defaults=TEMPLATE_DEFAULTS)
    spec.loras = [LoraRef(loras.get(lr.name, lr.name), lr.weight) for lr in spec.loras]
    spec.assets = [*assets, *spec.assets]      # the uploads named in `models`, then the key's LoRAs in tags
    spec.output_prefix, spec.output_stem, spec.output_format = output_prefix(svc, job_id), "image_", "jpeg"
    spec.sidecar_key = params_key(svc, job_id)
    spec.meta = {"task_type": mode, "warnings": warnings, "sidecar_style": "aws-params", "sidecar": {
        "parameters": echo_parameters(data), "endpont_name": pool, "endpoint_name": pool, "inference_id": job_id}}
    return spec


def pool_view(svc: Services, record: PoolRecord, live: int) -> dict:
    """A pool in GET /endpoints' shape, plus its replica figures."""
    in_service = live > 0 or record.in_service_at is not None
    return {
        "EndpointDeploymentJobId": record.job_id, "startTime": aws_time(record.started_at),
        "endTime": aws_time(record.in_service_at), "endpoint_name": record.name,
        "endpoint_status": "InService" if in_service else "Creating",
        "status": "success" if in_service else "inprogress",
        "instance_type": record.instance_type, "desired_instance_count": record.replicas,
        "current_instance_count": live, "pending_jobs": svc.store.pending_count(record.name),
    }


def unrecorded_pool(queue: str, live: int, since: float) -> PoolRecord:
    """A queue live workers serve that nobody recorded, shown as an InService pool."""
    return PoolRecord(queue, str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdqueue-pool:{queue}")), live,
                      started_at=since, in_service_at=since, extra={"recorded": False})


def now_text() -> str:
    return str(datetime.now(timezone.utc).replace(tzinfo=None))


def checkpoint_view(svc: Services, checkpoint: Checkpoint) -> dict:
    """A checkpoint as POST/PUT/GET /checkpoint show it."""
    return {"id": checkpoint.id, "type": checkpoint.type, "s3_location": svc.storage.s3_uri(checkpoint.prefix),
            "status": checkpoint.status, "params": checkpoint.params, "name": checkpoint.names}


def listed_view(svc: Services, checkpoint: Checkpoint) -> dict:
    """A checkpoint as GET /checkpoints lists it (camelCase s3Location, epoch `created`)."""
    return {"id": checkpoint.id, "s3Location": svc.storage.s3_uri(checkpoint.prefix),
            "type": checkpoint.type, "status": checkpoint.status, "name": checkpoint.names,
            "created": checkpoint.created, "params": checkpoint.params}


def modified_at(path: Path) -> float:
    """A file's mtime; 0 for one removed since the directory was listed (the listing is up to 2 s old)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def local_views(svc: Services) -> list[dict]:
    """Models and LoRAs already in the workers' directories, listed like Active checkpoints."""
    out = [{"id": f"local:{m.name}", "s3Location": "", "type": "Stable-diffusion", "status": "Active",
            "name": [m.name], "created": modified_at(m.path), "params": {"source": "model directory"}}
           for m in svc.catalog.models()]
    out += [{"id": f"local:{p.name}", "s3Location": "", "type": "Lora", "status": "Active", "name": [p.name],
             "created": modified_at(p), "params": {"source": "LoRA directory"}}
            for p in svc.catalog.loras().values()]
    return out
