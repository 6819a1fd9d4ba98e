"""The AWS SD extension API's inference and endpoint routes.

Why a translator: /inference/v2 becomes the canonical job on the queue of
the worker pool its `sagemaker_endpoint_name` names. Endpoints are worker
pools (common/store/pools.py): recorded here, served by whatever workers the
deployment starts for them. Answers are the extension's raw, unwrapped
bodies; errors are FastAPI's {"detail": ...}, and a wrong key gets API
Gateway's 403 {"message"}.

Every job, pool and uploaded checkpoint belongs to the key that made it:
another key's answers exactly as a missing one (common/store/pools.py says
which pools are shared).
"""
from __future__ import annotations

import uuid
from typing import Any, Callable

from flask import jsonify, request
from flask_smorest import Blueprint, abort
from marshmallow import ValidationError

from api.auth import bearer_token, current_key
from api.dialects.a1111 import screen_fields
from api.dialects.aws import schemas
from api.dialects.aws.errors import DIALECT, INFERENCE_BLUEPRINT, forbidden, inference_error, not_allowed
from api.dialects.aws.trainings import create_train_job_from
from api.dialects.aws.translate import (build_inference_jobspec, job_view, output_prefix, pool_view, resolve_loras,
                                        resolve_model, unrecorded_pool)
from api.errors import flatten_messages
from api.limits import read_limited, submit_limited
from api.schemas import json_body
from api.services import Services, services
from api.submission import new_task_id, submit_job
from common.errors import TaskNotFound
from common.store import PoolRecord, Task, TaskStatus


SECURITY = [{"ApiKeyAuth": []}]
CAPACITY_NOTE = ("sdqueue recorded this endpoint (a worker pool) and its desired replicas in Redis (hash sdq:pools); "
                 "it does not start machines. Capacity comes from the deployment: start workers with "
                 "`python -m worker.main --pool {name}` (compose: SDQ_WORKER_POOL={name}), or have an autoscaler "
                 "read sdq:pools. The endpoint is InService once a worker serves it; jobs sent before then wait in "
                 "its queue.")
LIST_ROUTES = {"/inference/get-lora-list": "Lora", "/inference/get-texual-inversion-list": "embeddings",
               "/inference/get-hypernetwork-list": "hypernetworks", "/inference/get-controlnet-model-list": "ControlNet"}

blp = Blueprint(INFERENCE_BLUEPRINT, __name__, description="AWS SD extension API: inference and endpoints")


@blp.before_request
def authenticate():
    """The key header, or `Authorization: Bearer <key>`."""
    return services().keys.check(DIALECT, bearer_token, forbidden, not_allowed)


# --- inference jobs ------------------------------------------------------------------------
def owned_job(svc: Services, job_id: str) -> Task:
    """The caller's AWS-extension job, else a 404 (another key's job does not exist for this one)."""
    try:
        task = svc.store.get_owned(job_id, current_key().owner)
    except TaskNotFound:
        abort(404, message=f"inference job {job_id} not found")
    if task.spec.dialect != DIALECT:
        abort(404, message=f"inference job {job_id} not found")
    return task


def output_urls(job_id: str, keys: Callable[[Task], list[str]]):
    """Presigned GET URLs of some of a job's objects once it succeeded, else [] (as the extension documents: ask after succeed)."""
    svc = services()
    task = owned_job(svc, job_id)
    return jsonify([svc.storage.url_for(k) for k in keys(task)] if task.status is TaskStatus.COMPLETED else [])


def visible_pool(svc: Services, name: str) -> bool:
    """A pool this key may name: its own, or a shared one (the default queue, a record without owner, a queue
    live workers serve that no key recorded). Another key's pool, like the webhook queue, is not there."""
    if name == svc.settings.callbacks.queue:
        return False
    if name == svc.settings.tasks.queue:
        return True
    record = svc.pools.get(name)
    if record is not None:
        return record.visible_to(current_key().owner)
    return name in svc.workers.serving_queues()


def claimable_pool(svc: Services, name: str) -> bool:
    """Whether this key may record `name` as its own pool: a new name, or one it recorded itself.

    Pool names are queue names, one namespace for every key: a shared pool
    and another key's pool are both refused, with the same answer.
    """
    record = svc.pools.get(name)
    if record is not None:
        return record.owner == current_key().owner
    return name != svc.settings.tasks.queue and name not in svc.workers.serving_queues()


def run_inference(svc: Services, raw: Any):
    """POST /inference/v2: validate, translate, queue on the endpoint's pool; answer at once."""
    if not isinstance(raw, dict):
        return inference_error(400, "Malformed JSON body: a JSON object is required")
    schema = schemas.IMG2IMG_REQUEST if raw.get("task_type") == "img2img" else schemas.TXT2IMG_REQUEST
    try:
        data = schema.load(raw)
    except ValidationError as exc:
        return inference_error(422, flatten_messages(exc.messages, ["body"]))
    pool = data["sagemaker_endpoint_name"]
    if not visible_pool(svc, pool):
        return inference_error(400, f"endpoint {pool} not found; GET /endpoints lists them")
    if not current_key().may_use_pool(pool):
        return inference_error(403, f"this API key may not use endpoint {pool}")
    store = svc.checkpoints
    models = data["models"]
    owner = current_key().owner
    try:
        model, assets = resolve_model(svc, store, models["Stable-diffusion"][0], owner)
        loras, lora_assets = resolve_loras(svc, store, models.get("Lora") or [], owner)
    except LookupError as exc:
        return inference_error(400, str(exc))
    if not current_key().may_use_model(model.name):
        return inference_error(403, f"this API key may not use model {model.name!r}")
    mode = data["task_type"]
    warnings = screen_fields(svc, data, mode)
    if len(models["Stable-diffusion"]) > 1:
        warnings.append("models.Stable-diffusion: only the first checkpoint is used")
    warnings += [f"models.{kind}: not loaded by sdqueue (ignored)" for kind, names in models.items()
                 if names and kind not in ("Stable-diffusion", "Lora")]
    job_id = new_task_id()
    spec = build_inference_jobspec(svc, data, job_id, model, assets + lora_assets, loras, warnings)
    submit_job(svc, owner, spec, job_id, queue=pool)
    return jsonify({"inference_id": job_id, "status": "inprogress", "endpoint_name": pool,
                    "output_path": svc.storage.s3_uri(output_prefix(svc, job_id))})


# --- endpoints (worker pools) ---------------------------------------------------------------
def endpoint_views(svc: Services) -> list[dict]:
    """The pools this key may see: its recorded ones and the shared ones (with their desired replicas), and
    any queue a live worker serves that no key recorded."""
    pools = svc.pools
    serving = svc.workers.serving_queues()
    views = []
    for record in pools.desired():
        workers = serving.pop(record.name, [])   # popped even when hidden: another key's pool is never "unrecorded"
        if workers:
            record = pools.mark_in_service(record)
        if record.visible_to(current_key().owner) or record.name == svc.settings.tasks.queue:
            views.append(pool_view(svc, record, len(workers)))
    for queue, workers in serving.items():
        if queue == svc.settings.callbacks.queue:
            continue
        since = min(w.started_at for w in workers)
        views.append(pool_view(svc, unrecorded_pool(queue, len(workers), since), len(workers)))
    return views


def create_endpoint(svc: Services, data: dict) -> dict:
    pools = svc.pools
    job_id = str(uuid.uuid4())
    name = data["endpoint_name"] or f"infer-endpoint-{job_id[:7]}"
    if not claimable_pool(svc, name):
        abort(400, message=f"endpoint name {name} is not available (a shared pool's or taken); choose another")
    record = pools.get(name) or PoolRecord(name, job_id, data["initial_instance_count"], owner=current_key().owner)
    record.replicas, record.instance_type = data["initial_instance_count"], data["instance_type"]
    record.extra["autoscaling"] = data["autoscaling_enabled"]
    pools.record(record)
    live = len(svc.workers.serving_queues().get(name, []))
    return {**pool_view(svc, record, live), "message": CAPACITY_NOTE.format(name=name)}


def delete_endpoints(svc: Services, names: list[str]):
    """Forget the caller's recorded pools; unknown names, shared pools and other keys' pools are skipped (as the
    original skips unknown ones), with the same answer."""
    pools = svc.pools
    mine = [n for n in names if (p := pools.get(n)) is not None and p.owner == current_key().owner]
    pools.forget(mine)
    return jsonify("Endpoint deleted")


# --- routes --------------------------------------------------------------------------------
@blp.route("/inference/test-connection", methods=["GET"])
@read_limited
@blp.doc(security=SECURITY)
def test_connection():
    """Whether the client reaches the API with a valid key."""
    return jsonify({"message": "Success"})


@blp.route("/inference/v2", methods=["POST"])
@submit_limited
@blp.doc(security=SECURITY, requestBody=json_body("task_type picks the request: img2img adds init_images (and mask)",
                                                 schemas.TXT2IMG_REQUEST, schemas.IMG2IMG_REQUEST))
def inference_v2():
    """Queue a txt2img/img2img job on the pool `sagemaker_endpoint_name` names; answers at once."""
    return run_inference(services(), request.get_json(silent=True))


@blp.route("/inference/v2/<string:job_id>/run", methods=["PUT"])
@submit_limited
@blp.doc(security=SECURITY, requestBody={**json_body("POST /train's body (the extension's document lists this route "
                                                     "as \"start training job\" with that body); without one, the "
                                                     "job's get-inference-job view", schemas.TrainJobCreate()),
                                         "required": False})
def run_job(job_id: str):
    """A training body creates a training job, as POST /train (the document's mislabel, served as such); else
    inference job `job_id` of this key as get-inference-job shows it (its run started when it was created)."""
    raw = request.get_json(silent=True)
    if isinstance(raw, dict) and "train_type" in raw:
        return create_train_job_from(services(), raw)
    return jsonify(job_view(owned_job(services(), job_id)))


@blp.route("/inference/get-inference-job", methods=["GET"])
@read_limited
@blp.arguments(schemas.JobQuery(), location="query")
@blp.doc(security=SECURITY)
def get_inference_job(query: dict):
    """One job of this key: inprogress, succeed or failed, with image names once done."""
    return jsonify(job_view(owned_job(services(), query["jobID"])))


@blp.route("/inference/list-inference-jobs", methods=["GET"])
@read_limited
@blp.doc(security=SECURITY)
def list_inference_jobs():
    """This key's AWS-extension jobs, newest first (at most aws.list_limit)."""
    svc = services()
    tasks, _ = svc.store.list_owned(current_key().owner, 0, svc.settings.aws.list_limit)
    return jsonify([job_view(t) for t in tasks if t.spec.dialect == DIALECT])


@blp.route("/inference/get-inference-job-image-output", methods=["GET"])
@read_limited
@blp.arguments(schemas.JobQuery(), location="query")
@blp.doc(security=SECURITY)
def image_output(query: dict):
    """Presigned GET URLs of a finished job's images ([] until it succeeds)."""
    return output_urls(query["jobID"], lambda task: task.result_keys)


@blp.route("/inference/get-inference-job-param-output", methods=["GET"])
@read_limited
@blp.arguments(schemas.JobQuery(), location="query")
@blp.doc(security=SECURITY)
def param_output(query: dict):
    """A presigned GET URL of the job's params JSON (request, seeds, infotexts), once it succeeded."""
    return output_urls(query["jobID"], lambda task: [task.spec.sidecar_key] if task.spec.sidecar_key else [])


@blp.route("/endpoints", methods=["GET"])
@read_limited
@blp.doc(security=SECURITY)
def list_endpoints():
    """Worker pools: this key's and the shared ones, and every queue a live worker serves (InService)."""
    return jsonify(endpoint_views(services()))


@blp.route("/endpoints", methods=["POST"])
@submit_limited
@blp.doc(security=SECURITY, requestBody=json_body("an endpoint to record, or {\"delete_endpoint_list\": [...]}",
                                                 schemas.EndpointCreate(), schemas.EndpointDelete()))
def post_endpoints():
    """Record a pool and its desired replicas; with `delete_endpoint_list`, forget pools (as the extension's samples do)."""
    raw = request.get_json(silent=True)
    if not isinstance(raw, dict):
        return inference_error(400, "Malformed JSON body: a JSON object is required")
    schema = schemas.EndpointDelete() if "delete_endpoint_list" in raw else schemas.EndpointCreate()
    try:
        data = schema.load(raw)
    except ValidationError as exc:
        return inference_error(422, flatten_messages(exc.messages, ["body"]))
    if "delete_endpoint_list" in data:
        return delete_endpoints(services(), data["delete_endpoint_list"])
    if data["endpoint_name"] == services().settings.callbacks.queue:
        return inference_error(422, flatten_messages(
            {"endpoint_name": [f"{data['endpoint_name']!r} is the webhook queue, not a worker pool"]}, ["body"]))
    return jsonify(create_endpoint(services(), data))


@blp.route("/endpoints", methods=["DELETE"])
@submit_limited
@blp.arguments(schemas.EndpointDelete(), location="json")
@blp.doc(security=SECURITY)
def delete_endpoints_route(data: dict):
    """Forget recorded pools (their workers keep running until the deployment stops them)."""
    return delete_endpoints(services(), data["delete_endpoint_list"])


@blp.route("/inference/get-endpoint-deployment-job", methods=["GET"])
@read_limited
@blp.arguments(schemas.JobQuery(), location="query")
@blp.doc(security=SECURITY)
def endpoint_deployment_job(query: dict):
    """One pool (this key's or a shared one) by its EndpointDeploymentJobId."""
    found = [v for v in endpoint_views(services()) if v["EndpointDeploymentJobId"] == query["jobID"]]
    if not found:
        return inference_error(404, f"endpoint deployment job {query['jobID']} not found")
    return jsonify(found[0])


def model_list_view(kind: str):
    """A bare list of the file names of one model type: the LoRA directory's and this key's Active uploads."""
    def view():
        svc = services()
        names = svc.checkpoints.active_names(kind, current_key().owner)
        local = [path.name for path in svc.catalog.loras().values()] if kind == "Lora" else []
        return jsonify(local + [n for n in names if n not in local])
    view.__doc__ = f"File names of the {kind} models available"
    return view


for _path, _kind in LIST_ROUTES.items():
    blp.add_url_rule(_path, endpoint=_path.rsplit("/", 1)[-1], methods=["GET"],
                     view_func=read_limited(model_list_view(_kind)))
