"""The AWS SD extension API's training jobs: POST /train, PUT /train, GET /trains (its first training API).

Why a translator onto api/trainings.py: sdqueue trains LoRAs, one core for
every API. The extension's body (dreambooth's db_config keys, or kohya's
toml sections, under `params.config_params`; the dataset and base model
under `params.training_params`) is mapped onto the native training request
and checked with the native schema, so both APIs accept the same values.
POST /train checks everything the job needs (an Enabled dataset of the key,
a trainable base) and records the job in `Initial`, as the original does;
PUT /train `Training` queues it as a task whose id is the job's, so the
native routes and /api/v1/tasks/{id}/events see it too.

A job's status is its task's: none yet `Initial`; waiting or running
`Training`; completed `Complete` (the LoRA it made is in `params.resp.lora`);
failed or cancelled `Fail` (`params.resp.error_msg`). Jobs and the models
they name are the key's own: another key's id answers as a missing one.
"""
from __future__ import annotations

import io
import json
import tarfile
import time
from typing import Any

from flask import jsonify
from marshmallow import ValidationError

from api.auth import ApiKey, current_key
from api.dialects.aws import schemas
from api.dialects.aws.checkpoints import SECURITY, blp
from api.dialects.aws.errors import models_error
from api.dialects.aws.models import weights_file
from api.dialects.aws.translate import uploaded_model
from api.dialects.native import TrainingCreateSchema
from api.errors import flatten_messages
from api.limits import read_limited, submit_limited
from api.services import Services, services
from api.trainings import Base, TrainingProblem, plan_training, produced_lora, submit_training
from common.catalog import WEIGHT_SUFFIXES
from common.errors import TaskNotFound
from common.store import Task, TaskStatus, TrainJob

TRAINING_VALUES = TrainingCreateSchema()
TRAIN_JOB_REQUEST = schemas.TrainJobCreate()
TRAINING_PARAMS, CONFIG_PARAMS = "params.training_params", "params.config_params"
# The native training field -> the config_params names that set it, first found wins (dreambooth's db_config is
# flat; kohya's toml sections are merged in, see config_values).
CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "max_steps": ("max_train_steps",),
    "epochs": ("num_train_epochs", "max_train_epochs"),
    "lora_name": ("output_name", "model_name"),
    "rank": ("network_dim", "lora_unet_rank"),
    "alpha": ("network_alpha",),
    "learning_rate": ("unet_lr", "lora_learning_rate", "learning_rate"),
    "resolution": ("resolution",),
    "batch_size": ("train_batch_size",),
    "gradient_accumulation": ("gradient_accumulation_steps",),
    "lr_scheduler": ("lr_scheduler",),
    "lr_warmup_steps": ("lr_warmup_steps",),
    "seed": ("seed",),
    "noise_offset": ("noise_offset",),
}
DATASET_FIELDS = ("s3_data_path", "data_tar_list", "s3_data_path_list", "dataset")
CLASS_DATA_FIELDS = ("class_data_tar_list", "s3_class_data_path_list")
MODEL_FIELDS = ("s3_model_path", "model")
STATUS_OF = {TaskStatus.PENDING: "Training", TaskStatus.PROCESSING: "Training", TaskStatus.COMPLETED: "Complete",
             TaskStatus.FAILED: "Fail", TaskStatus.CANCELLED: "Fail"}


# --- the request -> the native training request -------------------------------------------------
def config_values(config: dict) -> dict[str, tuple[str, Any]]:
    """config_params flattened: name -> (its path, value); kohya's sections merged in, top-level names first."""
    flat: dict[str, tuple[str, Any]] = {}
    for section, entries in config.items():
        if isinstance(entries, dict):
            for name, value in entries.items():
                flat.setdefault(name, (f"{CONFIG_PARAMS}.{section}.{name}", value))
    for name, value in config.items():
        if not isinstance(value, dict):
            flat[name] = (f"{CONFIG_PARAMS}.{name}", value)
    return flat


def training_side(value: Any) -> Any:
    """kohya writes a resolution as "512,512": its first number (a square side is what the trainer takes)."""
    return value.split(",")[0].strip() if isinstance(value, str) and "," in value else value


def refusal(params: dict, flat: dict[str, tuple[str, Any]]) -> TrainingProblem | None:
    """What sdqueue's LoRA trainer cannot do: a full fine-tune, another network, class images."""
    path, use_lora = flat.get("use_lora", ("", True))
    if use_lora in (False, 0, "false", "False"):
        return TrainingProblem(path, f"{path}: sdqueue trains LoRAs only; set use_lora to true", 400)
    path, module = flat.get("network_module", ("", ""))
    if module not in ("", None, "networks.lora"):
        return TrainingProblem(path, f"{path}: sdqueue trains LoRAs (networks.lora) only, not {module}", 400)
    training = params["training_params"]
    for name in CLASS_DATA_FIELDS:
        value = training.get(name)
        if any(isinstance(v, str) and v.strip() for v in (value if isinstance(value, list) else [value])):
            return TrainingProblem(name, f"{TRAINING_PARAMS}.{name}: class images (prior preservation) are not "
                                         f"supported; send [\"\"] or leave it out", 400)
    return None


def mapped_config(params: dict, flat: dict[str, tuple[str, Any]]) -> tuple[dict, dict[str, str], list[str]]:
    """The native fields config_params sets, the path each came from, and warnings."""
    request: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for field, names in CONFIG_FIELDS.items():
        found = next((flat[n] for n in names if n in flat and flat[n][1] not in (None, "")), None)
        if found is not None:
            request[field], sources[field] = training_side(found[1]) if field == "resolution" else found[1], found[0]
    if "max_steps" in request:
        request.pop("epochs", None)          # steps asked for outright win over epochs
    warnings = []
    concepts = (params.get("config_params") or {}).get("concepts_list")
    if isinstance(concepts, list) and concepts and isinstance(concepts[0], dict):
        prompt = concepts[0].get("instance_prompt") or concepts[0].get("instance_token")
        if prompt not in (None, ""):
            request["trigger_word"] = prompt
            sources["trigger_word"] = f"{CONFIG_PARAMS}.concepts_list[0].instance_prompt"
        if len(concepts) > 1:
            warnings.append(f"{CONFIG_PARAMS}.concepts_list: one concept is trained (the first one's "
                            f"instance_prompt is the trigger word); the others are ignored")
    return request, sources, warnings


def dataset_value(training: dict) -> tuple[str, str]:
    """The one dataset the request names: (its path, the value)."""
    found = []
    for name in DATASET_FIELDS:
        value = training.get(name)
        found += [(f"{TRAINING_PARAMS}.{name}", v.strip()) for v in (value if isinstance(value, list) else [value])
                  if isinstance(v, str) and v.strip()]
    if not found:
        raise TrainingProblem("dataset", f"{TRAINING_PARAMS}.data_tar_list: name the dataset to train on (its s3 "
                                         f"location, as GET /datasets lists it, or its name)", 400)
    if len({value.rstrip('/') for _, value in found}) > 1:
        raise TrainingProblem("dataset", f"{found[1][0]}: one dataset per training job", 400)
    return found[0]


def dataset_name(svc: Services, owner: str, path: str, value: str) -> str:
    """A dataset of this key named by its s3 location (GET /datasets' `s3`) or its name."""
    text, prefix = value.rstrip("/"), svc.storage.s3_uri(f"{svc.datasets.key_prefix}/{owner}") + "/"
    name = text[len(prefix):] if text.startswith(prefix) else text
    if not name or "/" in name or svc.datasets.get(owner, name) is None:
        raise TrainingProblem("dataset", f"{path}: dataset {value} is not found", 404)
    return name


def model_ref(svc: Services, owner: str, path: str, value: str) -> dict[str, str]:
    """A base named by its s3 location (a checkpoint's, or one file of it) or name: the model directory's, else an
    Active Stable-diffusion checkpoint of this key."""
    text = value.rstrip("/")
    prefix = svc.storage.s3_uri(f"{svc.checkpoints.key_prefix}/Stable-diffusion") + "/"
    if text.startswith(prefix):
        checkpoint_id, _, file = text[len(prefix):].partition("/")
        checkpoint = svc.checkpoints.get_visible(checkpoint_id, owner) if checkpoint_id else None
        if checkpoint is not None and checkpoint.status == "Active" and (not file or file in checkpoint.names):
            return {"checkpoint_id": checkpoint.id, "file": file or (weights_file(checkpoint) or "")}
    elif "/" not in text:
        if svc.catalog.model(text) is not None:
            return {"model": text}
        checkpoint = svc.checkpoints.find_active("Stable-diffusion", text, owner)
        if checkpoint is not None:
            return {"checkpoint_id": checkpoint.id, "file": text}
    raise TrainingProblem("model", f"{path}: model {value} is not found", 400)


def base_ref(svc: Services, owner: str, data: dict) -> tuple[dict[str, str], str, str]:
    """What to train on: (a reference stored with the job, the path that named it, its name for modelName)."""
    model_id = data.get("model_id")
    if model_id and model_id != "kohya":        # kohya jobs name their base in training_params
        model = svc.model_jobs.get(owner, model_id)
        if model is None:
            raise TrainingProblem("model", f"model with id {model_id} is not found", 404)
        if model.status != "Complete":
            raise TrainingProblem("model", f"model {model.name} is in {model.status} state, not valid to be used "
                                           f"for train", 400)
        ref = {"model": model.catalog_model} if model.catalog_model else {"checkpoint_id": model.checkpoint_id}
        return ref, "model_id", model.name
    training = data["params"]["training_params"]
    for name in MODEL_FIELDS:
        value = training.get(name)
        if isinstance(value, str) and value.strip():
            ref = model_ref(svc, owner, f"{TRAINING_PARAMS}.{name}", value.strip())
            return ref, f"{TRAINING_PARAMS}.{name}", ref.get("model") or ref.get("file", "")
    default = svc.catalog.default_model() or ""
    return {"model": default}, f"{TRAINING_PARAMS}.s3_model_path", default


def resolve_base(svc: Services, owner: str, ref: dict[str, str]) -> tuple[Base | None, str | None]:
    """A stored reference -> (the owned upload to train on with the file a worker fetches, or None and the
    catalog model's name); TrainingProblem when its checkpoint is no longer an Active one of this key."""
    if "checkpoint_id" not in ref:
        return None, ref.get("model") or None
    checkpoint = svc.checkpoints.get_visible(ref["checkpoint_id"], owner)
    file = ref.get("file") or (weights_file(checkpoint) if checkpoint else None)
    if checkpoint is None or checkpoint.status != "Active" or checkpoint.type != "Stable-diffusion" \
            or not file or not file.lower().endswith(WEIGHT_SUFFIXES):
        raise TrainingProblem("model", f"the base model's checkpoint {ref['checkpoint_id']} is not an Active "
                                       f"Stable-diffusion checkpoint of this key", 400)
    asset = checkpoint.asset(file)
    return Base(uploaded_model(svc, asset), [asset]), None


def checked_values(request: dict, sources: dict[str, str]) -> dict:
    """The native schema's check of the mapped values; a problem names the extension's field."""
    try:
        return TRAINING_VALUES.load(request)
    except ValidationError as exc:
        field, messages = next(iter(exc.messages.items()))
        path = sources.get(field, field)
        text = "; ".join(str(m) for m in messages) if isinstance(messages, list) else str(messages)
        raise TrainingProblem(path, f"{path}: {text}", 400) from None


def worded(problem: TrainingProblem, sources: dict[str, str]) -> TrainingProblem:
    """A core problem named by the extension's field, with the extension's statuses (400, 403, 404)."""
    path = sources.get(problem.field, problem.field)
    text = str(problem) if str(problem).startswith(path) else f"{path}: {problem}"
    return TrainingProblem(path, text, problem.status if problem.status in (403, 404) else 400)


def new_train_job(svc: Services, key: ApiKey, data: dict) -> TrainJob:
    """A validated POST /train body -> the job record, checked as the job will run; TrainingProblem if not."""
    owner, params = key.owner, data["params"]
    flat = config_values(params.get("config_params") or {})
    if problem := refusal(params, flat):
        raise problem
    path, value = dataset_value(params["training_params"])
    dataset = dataset_name(svc, owner, path, value)
    ref, model_path, model_name = base_ref(svc, owner, data)
    mapped, sources, warnings = mapped_config(params, flat)
    sources.update(dataset=path, model=model_path)
    request = checked_values({**mapped, "dataset": dataset}, sources)
    job_id = svc.train_jobs.new_id()
    try:
        base, request["model"] = resolve_base(svc, owner, ref)
        planned = plan_training(svc, key, request, job_id, base)
    except TrainingProblem as exc:
        raise worded(exc, sources) from None
    stored = {**params, "training_type": data["lora_train_type"],
              "training_params": {"model_name": model_name, **params["training_params"]}}
    location = svc.storage.s3_uri(f"{svc.settings.training.prefix.strip('/')}/{job_id}/input")
    return TrainJob(job_id, owner, data["train_type"], stored, request, ref, model_id=data.get("model_id") or "",
                    lora_train_type=data["lora_train_type"], input_location=location,
                    warnings=warnings + planned.warnings)


# --- views -------------------------------------------------------------------------------------
def job_task(svc: Services, job: TrainJob) -> Task | None:
    if job.submitted_at is None:
        return None
    try:
        return svc.store.get(job.id)
    except TaskNotFound:
        return None


def job_status(job: TrainJob, task: Task | None) -> str:
    if job.submitted_at is None:
        return "Initial"
    return STATUS_OF[task.status] if task is not None else "Fail"


def shown_params(job: TrainJob, task: Task | None) -> dict:
    """The stored params, with `resp` once the job ended: the LoRA it made ({name, file, checkpoint_id,
    s3_location}), or why it failed (as the original's status check writes it)."""
    if task is None or not task.status.terminal:
        return job.params
    if task.status is TaskStatus.COMPLETED:
        return {**job.params, "resp": {"lora": produced_lora(task)}}
    return {**job.params, "resp": {"status": "Failed", "error_msg": task.error or task.status.value}}


def job_view(job: TrainJob, task: Task | None) -> dict:
    """A job as PUT /train answers it (POST /train's lacks `created`)."""
    view = {"id": job.id, "status": job_status(job, task), "created": job.created, "trainType": job.train_type,
            "params": shown_params(job, task), "input_location": job.input_location}
    if job.warnings:
        view["warnings"] = job.warnings
    return view


def listed_view(job: TrainJob, task: Task | None) -> dict:
    """A job as GET /trains lists it (with its params: the LoRA is in params.resp once Complete)."""
    return {"id": job.id, "modelName": job.params["training_params"].get("model_name") or "not_applied",
            "status": job_status(job, task), "trainType": job.train_type, "created": job.created,
            "sagemakerTrainName": job.id if job.submitted_at else "", "params": shown_params(job, task)}


# --- what the routes do ------------------------------------------------------------------------
def create_train_job(svc: Services, data: dict):
    """POST /train: check and record the job in Initial; presigned PUT URLs for `filenames` (stored, not read)."""
    try:
        job = new_train_job(svc, current_key(), data)
    except TrainingProblem as exc:
        return models_error(exc.status, str(exc))
    svc.train_jobs.save(job)
    prefix = job.input_location.split("/", 3)[3]
    presigned = {name: svc.storage.upload_url(f"{prefix}/{name}") for name in data["filenames"]} \
        if data["filenames"] is not None else None
    view = {k: v for k, v in job_view(job, None).items() if k != "created"}
    return jsonify({"statusCode": 200, "job": view, "s3PresignUrl": presigned})


def create_train_job_from(svc: Services, raw: dict):
    """A training body sent to another route (PUT /inference/v2/{id}/run): validated as POST /train's."""
    try:
        data = TRAIN_JOB_REQUEST.load(raw)
    except ValidationError as exc:
        return models_error(422, flatten_messages(exc.messages, ["body"]))
    return create_train_job(svc, data)


DB_CONFIG_FILES = ("db_config.tar", "db_config.json")   # what the WebUI uploads beside a job (its dreambooth config)
MAX_CONFIG_BYTES = 4 * 1024 * 1024


def uploaded_config(svc: Services, job: TrainJob) -> dict:
    """The dreambooth config the extension's WebUI uploaded into the job's input location (db_config.tar holding
    a .json, or the .json itself), or {} when there is none; TrainingProblem when it cannot be read."""
    prefix = job.input_location.split("/", 3)[3]
    for name in DB_CONFIG_FILES:
        head = svc.storage.head(f"{prefix}/{name}")
        if head is None:
            continue
        if head[0] > MAX_CONFIG_BYTES:
            raise TrainingProblem(name, f"{name}: larger than {MAX_CONFIG_BYTES} bytes; not a config", 400)
        return parsed_config(name, svc.storage.get(f"{prefix}/{name}"))
    return {}


def parsed_config(name: str, data: bytes) -> dict:
    """A db_config's JSON object (from the first .json file of a tar, or the file itself)."""
    try:
        if name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".json")), None)
                if member is None:
                    raise TrainingProblem(name, f"{name}: holds no .json config", 400)
                data = tar.extractfile(member).read()
        value = json.loads(data)
    except (tarfile.TarError, ValueError) as exc:
        raise TrainingProblem(name, f"{name}: not a readable config ({exc})", 400) from None
    if not isinstance(value, dict):
        raise TrainingProblem(name, f"{name}: not a JSON object", 400)
    return value


def request_with_config(job: TrainJob, db_config: dict) -> tuple[dict, list[str]]:
    """The job's native request with an uploaded db_config's values under the body's (the body's win)."""
    params = {**job.params, "config_params": {**db_config, **(job.params.get("config_params") or {})}}
    flat = config_values(params["config_params"])
    if problem := refusal(params, flat):
        raise problem
    mapped, sources, warnings = mapped_config(params, flat)
    request = checked_values({**mapped, "dataset": job.request["dataset"]}, sources)
    return {**request, "model": job.request.get("model")}, warnings


def start_train_job(svc: Services, job_id: str):
    """PUT /train Training: queue the Initial job on the training pool (its task id is the job's); a job already
    started answers as it stands."""
    key = current_key()
    if svc.train_jobs.get(key.owner, job_id) is None:
        return models_error(404, f"train job with id {job_id} is not found")
    with svc.train_jobs.lock(key.owner, job_id):
        job = svc.train_jobs.get(key.owner, job_id)
        if job is None:                            # expired since the first read
            return models_error(404, f"train job with id {job_id} is not found")
        if job.submitted_at is None:
            try:
                db_config = uploaded_config(svc, job)
                if db_config:                      # the WebUI sends its settings as a file, not in config_params
                    job.request, mapped = request_with_config(job, db_config)
                    job.warnings = [*job.warnings, *mapped]
                base, model = resolve_base(svc, key.owner, job.base)
                _, warnings = submit_training(svc, key, {**job.request, "model": model}, task_id=job.id, base=base)
            except TrainingProblem as exc:
                return models_error(400 if exc.status == 422 else exc.status, str(exc))
            job.submitted_at, job.warnings = time.time(), list(dict.fromkeys(job.warnings + warnings))
            svc.train_jobs.save(job)
    return jsonify({"statusCode": 200, "job": job_view(job, job_task(svc, job))})


# --- routes --------------------------------------------------------------------------------
@blp.route("/train", methods=["POST"])
@submit_limited
@blp.arguments(TRAIN_JOB_REQUEST, location="json")
@blp.doc(security=SECURITY)
def post_train(data: dict):
    """Create a LoRA training job in Initial (checked now: an Enabled dataset, a trainable base); PUT /train
    starts it."""
    return create_train_job(services(), data)


@blp.route("/train", methods=["PUT"])
@submit_limited
@blp.arguments(schemas.TrainJobUpdate(), location="json")
@blp.doc(security=SECURITY)
def put_train(data: dict):
    """`status: Training` queues the job on the training pool (idempotent); other values change nothing."""
    if data["status"] != "Training":
        return jsonify({"statusCode": 200, "msg": f"not implemented for train job status {data['status']}"})
    return start_train_job(services(), data["train_job_id"])


@blp.route("/trains", methods=["GET"])
@read_limited
@blp.arguments(schemas.TrainJobsQuery(), location="query")
@blp.doc(security=SECURITY)
def list_train_jobs(query: dict):
    """This key's training jobs, newest first, optionally of some `types` (train_type) and `status`es."""
    svc = services()
    jobs = [job for job in svc.train_jobs.owned(current_key().owner)
            if not query["types"] or job.train_type in query["types"]]
    views = [listed_view(job, job_task(svc, job)) for job in jobs]
    return jsonify({"statusCode": 200, "trainJobs": [v for v in views if not query["status"]
                                                     or v["status"] in query["status"]]})
