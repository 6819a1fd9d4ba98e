"""Model merges (native /api/v1/merges, the AWS extension's /inference/run-model-merge): one core.

Why one core: whichever API a client speaks, a merge becomes the same
queued job (JobSpec.merge, run by worker/mergejob.py) on the merge pool
(`merge.queue`, default `training.queue`): it needs memory and minutes, not
an inference GPU. It is the AUTOMATIC1111 web UI's checkpoint merger (and
what the AWS SD extension's run-model-merge asks its endpoint for): weighted
sum A·(1−M) + B·M, or add difference A + (B − C)·M.

Everything is checked before anything is queued, each problem naming its
field: every input is a model of the model directory (a diffusers folder
is converted to a single file by the worker) or one of the key's own Active
Stable-diffusion checkpoints (by file name; another key's is not found, as
a missing one), all of one family; add difference has its tertiary model.
The result is the key's own Active Stable-diffusion checkpoint, whose id
derives from the task (known at once, and the same when a retried job
finishes twice).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable

from api.auth import ApiKey
from api.services import Services
from api.submission import new_task_id, submit_job
from api.uploads import uploaded_asset, uploaded_model
from common.catalog import ModelInfo
from common.errors import TaskNotFound
from common.jobspec import JobSpec
from common.store import Task, TaskStatus
from common.store.checkpoints import filename_problem

METHODS = ("weighted_sum", "add_difference")
# The request's names -> torch's (worker/merge.py DTYPES); keep: each tensor as the primary has it.
DTYPES = {"keep": "keep", "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
DEFAULT_MULTIPLIER = 0.3        # the web UI's checkpoint merger slider starts there
ROLES = ("primary", "secondary", "tertiary")
CONVERTIBLE_FAMILIES = ("sd1", "sdxl", "sdxl-refiner")   # folders worker/singlefile.py writes as one file
OUTPUT_SUFFIX = ".safetensors"   # what a merge writes (and reads)
KIND = "Stable-diffusion"        # the checkpoint type of a merge's inputs (the key's own) and of its result

Finder = Callable[[str], "ModelInfo | None"]


class MergeProblem(Exception):
    """A merge request that cannot run: `field` names what is wrong; `status` is the HTTP status."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status


@dataclass(frozen=True)
class MergeInput:
    """One checkpoint of a merge: a model of the model directory, or one of the key's uploads (asset)."""

    role: str
    name: str                    # as the client named it
    model: ModelInfo
    asset: dict[str, str] | None = None

    @property
    def stem(self) -> str:
        """The name without its suffix, as the web UI names its merges' inputs."""
        return self.name.rsplit(".", 1)[0] if self.name.lower().endswith((".safetensors", ".ckpt")) else self.name

    def to_spec(self) -> dict[str, Any]:
        if self.asset is not None:
            return {"role": self.role, "name": self.name, "source": "checkpoint", "asset": self.asset}
        return {"role": self.role, "name": self.name, "source": "catalog", "model": self.model.name}


@dataclass
class Planned:
    """A merge ready to submit, and what the client should know about it."""

    spec: JobSpec
    warnings: list[str]


def merge_queue(settings: Any) -> str:
    """The pool merges run on: merge.queue, else the training pool."""
    return settings.merge.queue or settings.training.queue


def merge_checkpoint_id(task_id: str) -> str:
    """The id of the checkpoint a merge registers: derived from the task, so it is known when the job is queued."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdqueue-merge:{task_id}"))


def resolve_input(svc: Services, key: ApiKey, role: str, name: str, find: Finder | None = None) -> MergeInput:
    """The checkpoint `name` names: a model of the model directory (`find`: how the dialect looks one up), else
    one of the key's Active Stable-diffusion checkpoints (file name); MergeProblem naming `role` otherwise."""
    model = (find or svc.catalog.model)(name)
    if model is not None:
        return catalog_input(key, role, name, model)
    try:
        asset = uploaded_asset(svc.checkpoints, KIND, name, key.owner)
    except LookupError:
        raise MergeProblem(role, f"model {name!r} is neither in the model directory nor one of this key's Active "
                                 f"{KIND} checkpoints") from None
    if not name.lower().endswith(OUTPUT_SUFFIX):
        raise MergeProblem(role, f"checkpoint {name!r} is not a .safetensors file; a merge reads .safetensors only")
    model = uploaded_model(svc, asset)
    if not key.may_use_model(model.name):           # as /inference/v2 checks an upload (by its worker-side name)
        raise MergeProblem(role, f"this API key may not use model {name!r}", 403)
    return MergeInput(role, name, model, asset)


def catalog_input(key: ApiKey, role: str, name: str, model: ModelInfo) -> MergeInput:
    """A model of the model directory, if this key may use it and a merge can read it."""
    if not key.may_use_model(model.name):
        raise MergeProblem(role, f"this API key may not use model {model.name!r}", 403)
    if model.problem:
        raise MergeProblem(role, f"model {model.name!r} cannot be merged: {model.problem}")
    if model.kind == "diffusers" and model.family not in CONVERTIBLE_FAMILIES:
        raise MergeProblem(role, f"model {model.name!r} is a diffusers folder of {model.profile.label}; a merge "
                                 "converts SD 1.x and SDXL folders to single files only (merge single files of "
                                 "other families)")
    if model.kind == "single_file" and not model.path.name.lower().endswith(OUTPUT_SUFFIX):
        raise MergeProblem(role, f"model {model.name!r} is not a .safetensors file; a merge reads .safetensors only")
    return MergeInput(role, name, model)


def one_family(inputs: list[MergeInput]) -> str:
    """The family every input shares (the web UI would merge anything of equal shapes; different families never
    have them)."""
    primary = inputs[0]
    for other in inputs[1:]:
        if other.model.family != primary.model.family:
            raise MergeProblem(other.role, f"{other.name!r} is {other.model.profile.label} but the primary "
                                           f"{primary.name!r} is {primary.model.profile.label}: a merge takes "
                                           "checkpoints of one family")
    return primary.model.family


def default_stem(inputs: list[MergeInput], method: str, multiplier: float) -> str:
    """The web UI's name for a merge without a custom name: "0.7(a) + 0.3(b)" or "a + 0.3(b - c)"."""
    names = [i.stem for i in inputs]
    if method == "weighted_sum":
        return f"{round(1 - multiplier, 2)}({names[0]}) + {round(multiplier, 2)}({names[1]})"
    return f"{names[0]} + {round(multiplier, 2)}({names[1]} - {names[2]})"


def output_file(svc: Services, data: dict[str, Any], inputs: list[MergeInput], task_id: str,
                find: Finder | None) -> str:
    """The merged checkpoint's file name: the request's name, else the web UI's (or merge-{id} when the inputs'
    names make no plain file name); never a model directory's name (it would hide the merge)."""
    if data.get("name"):
        file = f"{data['name']}{OUTPUT_SUFFIX}"
        if problem := filename_problem(file):
            raise MergeProblem("name", problem)
    else:
        file = f"{default_stem(inputs, data['method'], data['multiplier'])}{OUTPUT_SUFFIX}"
        if filename_problem(file):
            file = f"merge-{task_id[:8]}{OUTPUT_SUFFIX}"
    if svc.catalog.model(file) is not None or (find is not None and find(file) is not None):
        raise MergeProblem("name", f"{file!r} is a model of the model directory; choose another name")
    return file


def check_method(data: dict[str, Any]) -> None:
    method, multiplier = data["method"], data["multiplier"]
    if method not in METHODS:
        raise MergeProblem("method", f"{method!r} is not one of {', '.join(METHODS)}")
    if not 0 <= multiplier <= 1:
        raise MergeProblem("multiplier", "must be between 0 and 1 (the web UI's range)")
    if method == "add_difference" and not data.get("tertiary"):
        raise MergeProblem("tertiary", "add_difference needs a tertiary model (the base the secondary was tuned "
                                       "from): A + (B - C) x M")
    if method == "weighted_sum" and data.get("tertiary"):
        raise MergeProblem("tertiary", "a weighted sum takes no tertiary model; use add_difference for three")
    if data["dtype"] not in DTYPES:
        raise MergeProblem("dtype", f"{data['dtype']!r} is not one of {', '.join(DTYPES)}")


def plan_merge(svc: Services, key: ApiKey, data: dict[str, Any], task_id: str, find: Finder | None = None) -> Planned:
    """A validated merge request -> the job (JobSpec.merge) and its warnings; MergeProblem if it cannot run.

    `data`: primary, secondary, tertiary (or None), method, multiplier, name (or None), dtype, and optionally
    callback_url, callback_events, dialect, meta, warnings (the dialect's own).
    """
    check_method(data)
    inputs = [resolve_input(svc, key, role, data[role], find) for role in ROLES if data.get(role)]
    family = one_family(inputs)
    file = output_file(svc, data, inputs, task_id, find)
    checkpoint_id = merge_checkpoint_id(task_id)
    merge = {"inputs": [i.to_spec() for i in inputs], "method": data["method"], "multiplier": data["multiplier"],
             "dtype": DTYPES[data["dtype"]], "file": file, "family": family, "checkpoint_id": checkpoint_id}
    primary = inputs[0].model
    warnings = [*data.get("warnings", []), *pool_warnings(svc)]
    spec = JobSpec(prompt="", model=primary.name, width=primary.native_size, height=primary.native_size,
                   num_inference_steps=0, guidance_scale=0.0, seed=0, dialect=data.get("dialect", "native"),
                   family=family, merge=merge, time_limit=svc.settings.merge.time_limit,
                   assets=[i.asset for i in inputs if i.asset is not None], callback_url=data.get("callback_url"),
                   callback_events=data.get("callback_events") or None,
                   meta={**(data.get("meta") or {}), **({"warnings": warnings} if warnings else {})})
    return Planned(spec, warnings)


def pool_warnings(svc: Services) -> list[str]:
    """What may surprise the client: no worker serving the merge pool."""
    queue = merge_queue(svc.settings)
    if any(queue in worker.queues for worker in svc.workers.live()):
        return []
    return [f"no worker serves the merge pool {queue!r} now; the merge waits until one starts "
            f"(python -m worker.main --pool {queue})"]


def submit_merge(svc: Services, key: ApiKey, data: dict[str, Any], task_id: str | None = None,
                 find: Finder | None = None) -> tuple[str, Planned]:
    """Plan and queue a merge on the merge pool; its task id and plan."""
    task_id = task_id or new_task_id()
    planned = plan_merge(svc, key, data, task_id, find)
    task_id = submit_job(svc, key.owner, planned.spec, task_id, queue=merge_queue(svc.settings))
    svc.store.index_merge(key.owner, task_id)
    return task_id, planned


def owned_merge(svc: Services, owner: str, task_id: str) -> Task | None:
    """The key's merge `task_id`, or None (missing, another key's, or not a merge alike)."""
    try:
        task = svc.store.get_owned(task_id, owner)
    except TaskNotFound:
        return None
    return task if task.spec.merge else None


def produced_checkpoint(task: Task) -> dict[str, Any] | None:
    """The checkpoint a completed merge registered (file name, id, S3 location, family, tensors)."""
    return task.result.get("checkpoint") if task.status is TaskStatus.COMPLETED else None


def merge_inputs(task: Task) -> dict[str, str | None]:
    """A merge's inputs as the client named them, by role."""
    named = {item["role"]: item["name"] for item in (task.spec.merge or {}).get("inputs", [])}
    return {role: named.get(role) for role in ROLES}
