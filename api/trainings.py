"""LoRA training jobs (native /api/v1/trainings, the AWS extension's training routes): one core.

Why one core: whichever API a client speaks, a training request becomes the
same queued job (JobSpec.training, run by worker/trainingjob.py) on the
training pool (`training.queue`, default `train`), so it never holds an
inference GPU unless an operator points that setting at the inference
queue. Everything a key can name here is its own: its Enabled dataset (by
name, as the AWS extension names them), its job, and the LoRA the job
registers; another key's are "not found".

The dataset's images and captions are captured into the job when it is
submitted: a dataset changed or deleted later does not change a job that
already waits (a file deleted from S3 fails it with the file's name).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from api.auth import ApiKey
from api.services import Services
from api.uploads import owned_model
from api.submission import new_task_id, resolve_seed, submit_job
from common.catalog import ModelInfo
from common.jobspec import JobSpec
from common.errors import TaskNotFound
from common.store import Dataset, Task, TaskStatus
from common.store.datasets import NAME

TRAINABLE_FAMILIES = ("sd1", "sd2", "sdxl")      # what worker/training.py trains (a UNet with cross-attention)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DEFAULT_STEPS = 500
LORA_NAME = NAME     # a LoRA's name is its file's stem: the dataset names' rule (letters, digits, '_.-')


class TrainingProblem(Exception):
    """A training request that cannot run: `field` names what is wrong; `status` is the HTTP status."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status


@dataclass
class Planned:
    """A training job ready to submit, and what the client should know about it."""

    spec: JobSpec
    warnings: list[str]


def enabled_dataset(svc: Services, owner: str, name: str) -> Dataset:
    """The key's dataset called `name`, Enabled and holding images; TrainingProblem otherwise."""
    dataset = svc.datasets.get(owner, name)
    if dataset is None:
        raise TrainingProblem("dataset", f"dataset {name!r} not found", 404)
    if dataset.status != "Enabled":
        raise TrainingProblem("dataset", f"dataset {name!r} is {dataset.status}; enable it once its files are "
                                         f"uploaded (POST /api/v1/datasets/{name}/enable or PUT /dataset)", 409)
    if not dataset.images:
        raise TrainingProblem("dataset", f"dataset {name!r} holds no images")
    return dataset


@dataclass
class Base:
    """A base model its dialect resolved itself (an upload of the key: the AWS extension's models) and the
    files a worker fetches before loading it (JobSpec.assets)."""

    model: ModelInfo
    assets: list[dict[str, str]]


def base_model(svc: Services, key: ApiKey, name: str | None) -> ModelInfo:
    """The catalog model to train on (the default one when none is named): SD 1.x/2.x or SDXL."""
    name = name or svc.catalog.default_model()
    model = svc.catalog.model(name) if name else None
    if model is None:
        raise TrainingProblem("model", f"model {name!r} is neither in the model directory (GET /api/v1/models) "
                                       f"nor one of this key's own checkpoints")
    return trainable(key, model)


def trainable(key: ApiKey, model: ModelInfo) -> ModelInfo:
    """`model` if this key may use it and the trainer can train on its family; TrainingProblem otherwise."""
    if not key.may_use_model(model.name):
        raise TrainingProblem("model", f"this API key may not use model {model.name!r}", 403)
    if model.family not in TRAINABLE_FAMILIES:
        raise TrainingProblem("model", f"LoRA training runs on SD 1.x/2.x and SDXL models; {model.name!r} is "
                                       f"{model.family}")
    return model


def steps_for_epochs(epochs: int, images: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps that show every image `epochs` times (an epoch is ceil(images / batch) micro-batches)."""
    return max(1, math.ceil(epochs * math.ceil(images / batch_size) / accumulation))


def training_config(svc: Services, model: ModelInfo, images: int, data: dict[str, Any]) -> dict[str, Any]:
    """worker.training.TrainingConfig's fields from a validated request: defaults filled, steps resolved."""
    batch, accumulation = data.get("batch_size") or 1, data.get("gradient_accumulation") or 1
    if data.get("max_steps") and data.get("epochs"):
        raise TrainingProblem("epochs", "give max_steps or epochs, not both")
    steps = data.get("max_steps") or (steps_for_epochs(data["epochs"], images, batch, accumulation)
                                      if data.get("epochs") else DEFAULT_STEPS)
    limit = svc.settings.training.max_steps
    if steps > limit:
        raise TrainingProblem("epochs" if data.get("epochs") else "max_steps",
                              f"{steps} steps is more than this service allows ({limit}, training.max_steps)")
    resolution = data.get("resolution") or max(model.request_defaults.width, model.request_defaults.height)
    if resolution % 64:
        raise TrainingProblem("resolution", "must be a multiple of 64")
    rank = data.get("rank") or 8
    every = data.get("checkpoint_every")
    return {"max_steps": steps, "rank": rank, "alpha": float(data.get("alpha") or rank),
            "learning_rate": data.get("learning_rate") or 1e-4, "lr_scheduler": data.get("lr_scheduler") or "constant",
            "lr_warmup_steps": data.get("lr_warmup_steps") or 0, "batch_size": batch,
            "gradient_accumulation": accumulation, "resolution": resolution,
            "mixed_precision": data.get("mixed_precision") or "no", "seed": resolve_seed(data.get("seed")),
            "trigger_word": data.get("trigger_word") or "",
            "checkpoint_every": svc.settings.training.checkpoint_every if every is None else every,
            "noise_offset": data.get("noise_offset") or 0.0,
            "gradient_checkpointing": bool(data.get("gradient_checkpointing"))}


def plan_training(svc: Services, key: ApiKey, data: dict[str, Any], task_id: str, base: Base | None = None) -> Planned:
    """A validated training request -> the job (JobSpec.training) and its warnings; TrainingProblem if it
    cannot run. `base`: a base model the dialect resolved (else data["model"] names a catalog model)."""
    owner = key.owner
    dataset = enabled_dataset(svc, owner, data["dataset"])
    if base is None and data.get("model") and svc.catalog.model(data["model"]) is None:
        own = owned_model(svc, owner, data["model"])      # one of the key's own checkpoints, by its file name
        base = Base(own[0], [own[1]]) if own is not None else None
    model = trainable(key, base.model) if base else base_model(svc, key, data.get("model"))
    images = dataset.images
    config = training_config(svc, model, len(images), data)
    lora_name = data.get("lora_name") or f"{dataset.name}-{task_id[:8]}"
    if not LORA_NAME.match(lora_name):
        raise TrainingProblem("lora_name", "letters, digits and '_.-' only, at most 100, starting with a letter "
                                           "or digit")
    if lora_name in svc.catalog.loras():
        raise TrainingProblem("lora_name", f"{lora_name!r} is a LoRA of the shared LoRA directory, which requests "
                                           f"naming it get; choose another name")
    training = {"config": config, "dataset": dataset.name, "lora_name": lora_name,
                "examples": [{"key": item.key, "caption": item.caption or ""} for item in images],
                "state_key": f"{svc.settings.training.prefix.strip('/')}/{task_id}/state.pt"}
    spec = JobSpec(prompt="", model=model.name, width=config["resolution"], height=config["resolution"],
                   num_inference_steps=config["max_steps"], guidance_scale=0.0, seed=config["seed"],
                   dialect=data.get("dialect", "native"), family=model.family, training=training,
                   time_limit=svc.settings.training.time_limit, max_attempts=svc.settings.training.max_attempts,
                   callback_url=data.get("callback_url"),
                   callback_events=data.get("callback_events") or None, meta=data.get("meta") or {},
                   assets=list(base.assets) if base else [])
    return Planned(spec, training_warnings(svc, dataset, len(images)))


def training_warnings(svc: Services, dataset: Dataset, images: int) -> list[str]:
    """What may surprise the client: no worker serving the training pool, uncaptioned images."""
    warnings = []
    queue = svc.settings.training.queue
    if not any(queue in worker.queues for worker in svc.workers.live()):
        warnings.append(f"no worker serves the training pool {queue!r} now; the job waits until one starts "
                        f"(python -m worker.main --pool {queue})")
    uncaptioned = sum(1 for item in dataset.images if not item.caption)
    if uncaptioned:
        warnings.append(f"{uncaptioned} of {images} images have no caption; they train on the trigger word alone")
    return warnings


def submit_training(svc: Services, key: ApiKey, data: dict[str, Any], task_id: str | None = None,
                    base: Base | None = None) -> tuple[str, list[str]]:
    """Plan and queue a training job on the training pool; its task id and warnings (a task id that exists
    already queues nothing: submit_job is idempotent)."""
    task_id = task_id or new_task_id()
    planned = plan_training(svc, key, data, task_id, base)
    if planned.warnings:
        planned.spec.meta = {**planned.spec.meta, "warnings": planned.warnings}
    task_id = submit_job(svc, key.owner, planned.spec, task_id, queue=svc.settings.training.queue)
    svc.store.index_training(key.owner, task_id)
    return task_id, planned.warnings


def owned_training(svc: Services, owner: str, task_id: str) -> Task | None:
    """The key's training job `task_id`, or None (missing, another key's, or not a training job alike)."""
    try:
        task = svc.store.get_owned(task_id, owner)
    except TaskNotFound:
        return None
    return task if task.spec.training else None


def produced_lora(task: Task) -> dict[str, Any] | None:
    """The LoRA a completed training job registered: name (for `loras` / `<lora:name>`), file, checkpoint id."""
    return task.result.get("lora") if task.status is TaskStatus.COMPLETED else None

