"""The AWS SD extension API's "models": POST /model, PUT /model, GET /models (base models for training).

Why: the extension's training jobs train on a "model" (`model_id`), which
its clients create by uploading a checkpoint, usually as a `.tar`, with
presigned multipart part URLs, then PUT /model `Creating`; the original
converts it on a SageMaker endpoint. Here the upload is an owned
Stable-diffusion checkpoint of the key (the /checkpoint machinery opens and
completes it), and a callbacks worker unpacks the archive into it
(worker/modeljob.py): the model is `Complete` once its checkpoint is Active,
or `Fail` with the reason. A model may also name what exists already (an
Active checkpoint of the key, or a model of the model directory): it is
`Complete` at once. A model is its key's: another key's id answers as a
missing one, and is never listed.
"""
from __future__ import annotations

from flask import jsonify

from api.auth import current_key
from api.dialects.aws import schemas
from api.dialects.aws.checkpoints import SECURITY, blp, complete_uploads, name_problem, open_uploads
from api.dialects.aws.errors import models_error
from api.dialects.aws.translate import now_text
from api.limits import read_limited, submit_limited
from api.services import Services, services
from common.catalog import WEIGHT_SUFFIXES
from common.queue import send_create_model
from common.store import ModelJob
from common.store.checkpoints import Checkpoint

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
NEEDS_A_SOURCE = ("either checkpoint_id or filenames need to be provided (or params.create_model_params.ckpt_path "
                  "naming a model of the model directory or an Active Stable-diffusion checkpoint of this key)")


def stored_name(model_name: str, filename: str) -> str:
    """Where an upload lands in the model's checkpoint: an archive under its own name (unpacked later), a
    checkpoint as {model name}{suffix} at once (the name an unpacked archive gets too)."""
    if filename.lower().endswith(ARCHIVE_SUFFIXES):
        return filename
    return model_name + next(s for s in WEIGHT_SUFFIXES if filename.lower().endswith(s))


def weights_file(checkpoint: Checkpoint) -> str | None:
    """The checkpoint's first file a worker can load (what a model made from it trains on)."""
    return next((n for n in checkpoint.names if n.lower().endswith(WEIGHT_SUFFIXES)), None)


def model_checkpoint(svc: Services, model: ModelJob) -> Checkpoint | None:
    return svc.checkpoints.get(model.checkpoint_id) if model.checkpoint_id else None


def model_view(svc: Services, model: ModelJob) -> dict:
    """A model as GET /models lists it, plus where its weights are: `checkpoint_id` and `checkpoint_name` (the
    file /inference/v2 and s3_model_path may name) or `catalog_model`, and `error` once it failed."""
    checkpoint = model_checkpoint(svc, model)
    view = {"id": model.id, "model_name": model.name, "created": model.created, "params": model.params,
            "status": model.status, "output_s3_location": svc.storage.s3_uri(checkpoint.prefix) if checkpoint else ""}
    if checkpoint is not None:
        view.update(checkpoint_id=checkpoint.id, checkpoint_name=weights_file(checkpoint) if model.status ==
                    "Complete" else None)
    if model.catalog_model:
        view["catalog_model"] = model.catalog_model
    if model.error:
        view["error"] = model.error
    return view


def existing_source(svc: Services, data: dict, owner: str) -> tuple[str, str] | str:
    """What a model without an upload is: (checkpoint id, "") or ("", catalog model name); else why not."""
    if data["checkpoint_id"]:
        checkpoint = svc.checkpoints.get_visible(data["checkpoint_id"], owner)
        if checkpoint is None or checkpoint.type != "Stable-diffusion" or checkpoint.status != "Active" \
                or weights_file(checkpoint) is None:
            return f"checkpoint {data['checkpoint_id']} is not an Active Stable-diffusion checkpoint of this key"
        return checkpoint.id, ""
    ckpt_path = (data["params"].get("create_model_params") or {}).get("ckpt_path")
    if not isinstance(ckpt_path, str) or not ckpt_path:
        return NEEDS_A_SOURCE
    name = ckpt_path.replace("\\", "/").rsplit("/", 1)[-1]
    if svc.catalog.model(name) is not None:
        return "", name
    checkpoint = svc.checkpoints.find_active("Stable-diffusion", name, owner)
    if checkpoint is None:
        return (f"params.create_model_params.ckpt_path: {ckpt_path} is not a model of the model directory or an "
                f"Active Stable-diffusion checkpoint of this key")
    return checkpoint.id, ""


def create_from_upload(svc: Services, model: ModelJob, file: dict) -> tuple[ModelJob, dict]:
    """The model's checkpoint in Initial with the file's multipart upload; the presigned part URLs by file name."""
    model.filename, model.upload = file["filename"], stored_name(model.name, file["filename"])
    checkpoint = svc.checkpoints.new("Stable-diffusion", [model.upload], {}, model.owner)
    opened = open_uploads(svc, checkpoint, [(model.upload, file["parts_number"])])
    uploads = {name: {k: v for k, v in upload.items() if k != "urls"} for name, upload in opened.items()}
    checkpoint.params = {"created": now_text(), "model_id": model.id, "multipart_upload": uploads}
    svc.checkpoints.save(checkpoint)
    model.checkpoint_id = checkpoint.id
    return model, {file["filename"]: opened[model.upload]["urls"]}


def create_model(svc: Services, data: dict):
    """POST /model: Initial with presigned part URLs for its file, or Complete at once naming what exists."""
    owner = current_key().owner
    model = ModelJob(svc.model_jobs.new_id(), owner, data["name"], data["model_type"], data["params"])
    presigned: dict = {}
    if data["filenames"]:
        for suffix in WEIGHT_SUFFIXES:   # the checkpoint's name-to-be must not be shadowed by the model directory
            if problem := name_problem(svc, "Stable-diffusion", data["name"] + suffix):
                return models_error(400, f"name: {problem}; choose another model name")
        model, presigned = create_from_upload(svc, model, data["filenames"][0])
    else:
        source = existing_source(svc, data, owner)
        if isinstance(source, str):
            return models_error(400, source)
        model.checkpoint_id, model.catalog_model = source
        model.status = "Complete"
    svc.model_jobs.save(model)
    checkpoint = model_checkpoint(svc, model)
    return jsonify({"statusCode": 200, "job": {
        "id": model.id, "status": model.status, "s3_base": svc.storage.s3_uri(checkpoint.prefix) if checkpoint else "",
        "model_type": model.model_type, "params": model.params}, "s3PresignUrl": presigned})


def start_creating(svc: Services, model: ModelJob, tags: dict[str, list[dict]]):
    """Complete the upload (the client's ETags, else the parts S3 holds) and queue the unpacking; an error
    answer, or None."""
    checkpoint = model_checkpoint(svc, model)
    if checkpoint is None:
        return models_error(400, f"model {model.id} has no upload to create it from")
    with svc.checkpoints.lock(checkpoint.id):
        checkpoint = svc.checkpoints.get(checkpoint.id)
        if checkpoint.uploads:
            tags = {model.upload: tags[model.filename]} if model.filename in tags else tags
            try:
                complete_uploads(svc, checkpoint, tags)
            except ValueError as exc:
                svc.checkpoints.save(checkpoint)   # files completed so far stay completed
                return models_error(400, str(exc))
            svc.checkpoints.save(checkpoint)
    previous, model.status, model.error = model.status, "Creating", ""
    svc.model_jobs.save(model)
    try:
        send_create_model(svc.celery, model.owner, model.id, svc.settings.callbacks.queue)
    except Exception:
        model.status = previous               # not queued: a retried PUT queues it
        svc.model_jobs.save(model)
        raise
    return None


def update_model(svc: Services, data: dict):
    """PUT /model: Creating makes the model from its upload (again, after a Fail); Fail marks it failed."""
    owner, wanted = current_key().owner, data["model_id"]
    if svc.model_jobs.get(owner, wanted) is None:
        return models_error(404, f"create model with id {wanted} is not found")
    if data["status"] not in ("Creating", "Fail"):
        return models_error(400, f"a model's status cannot be set to {data['status']}: send Creating (or Fail)")
    with svc.model_jobs.lock(owner, wanted):
        model = svc.model_jobs.get(owner, wanted)
        if model is None:                          # gone since the first read (it expired, or was removed)
            return models_error(404, f"create model with id {wanted} is not found")
        if data["status"] == "Fail" and model.status != "Complete":
            model.status, model.error = "Fail", "marked Fail by the client"
            svc.model_jobs.save(model)
        elif data["status"] == "Creating" and model.status in ("Initial", "Fail"):
            if (refused := start_creating(svc, model, data["multi_parts_tags"])) is not None:
                return refused
    checkpoint = model_checkpoint(svc, model)
    return jsonify({"statusCode": 200, "job": {
        "output_path": svc.storage.s3_uri(checkpoint.prefix) if checkpoint else "", "id": model.id,
        "endpointName": "", "jobStatus": model.status, "jobType": model.model_type}})


# --- routes --------------------------------------------------------------------------------
@blp.route("/model", methods=["POST"])
@submit_limited
@blp.arguments(schemas.ModelJobCreate(), location="json")
@blp.doc(security=SECURITY)
def post_model(data: dict):
    """Create a base model for training: presigned part URLs for its file (a .tar holding a checkpoint, or the
    checkpoint), or Complete at once from checkpoint_id / params.create_model_params.ckpt_path."""
    return create_model(services(), data)


@blp.route("/model", methods=["PUT"])
@submit_limited
@blp.arguments(schemas.ModelJobUpdate(), location="json")
@blp.doc(security=SECURITY)
def put_model(data: dict):
    """Creating: complete the upload and make the model (a callbacks worker unpacks it; GET /models shows
    Complete or Fail); idempotent while Creating or Complete."""
    return update_model(services(), data)


@blp.route("/models", methods=["GET"])
@read_limited
@blp.arguments(schemas.ModelJobsQuery(), location="query")
@blp.doc(security=SECURITY)
def list_models(query: dict):
    """This key's models, newest first, optionally of some `types` and `status`es."""
    svc = services()
    found = [model_view(svc, m) for m in svc.model_jobs.owned(current_key().owner)
             if (not query["types"] or m.model_type in query["types"])
             and (not query["status"] or m.status in query["status"])]
    return jsonify({"statusCode": 200, "models": found})
