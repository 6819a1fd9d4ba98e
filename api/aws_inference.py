"""The AWS extension middleware's inference and endpoint API (seed 001).

Why a translator: /inference/v2 carries A1111 parameters plus the
extension's envelope; it becomes the canonical job on the queue of the
worker pool its `sagemaker_endpoint_name` names, with the images written
where the extension puts them (out/{job}/result/image_{n}.jpg) and the
params JSON beside them. Endpoints are worker pools (common/pools.py):
recorded here, served by whatever workers the deployment starts for them.
Answers are the seed's raw, unwrapped bodies; errors are FastAPI's
{"detail": ...}, and a wrong key gets API Gateway's 403 {"message"}.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any, Callable

from flask import jsonify, request
from flask_smorest import Blueprint, abort
from marshmallow import Schema, ValidationError

from api.a1111 import build_a1111_jobspec, echo_parameters, find_checkpoint, unhonoured
from api.auth import bearer_token, current_key
from api.aws_schemas import EndpointCreate, EndpointDelete, JobQuery, inference_schemas
from api.errors import DIALECT_RENDERERS, error_response, flatten_messages, json_error
from api.services import Services, services
from api.submission import new_task_id, submit_job
from common.catalog import WEIGHT_SUFFIXES, ModelInfo
from common.store.checkpoints import CheckpointStore
from common.jobspec import LoraRef
from common.store.pools import PoolRecord
from common.store.tasks import Task, TaskNotFound, TaskStatus

BLUEPRINT = "aws_inference"
DIALECT = "aws"
SECURITY = [{"ApiKeyAuth": []}]
STATUS_NAMES = {TaskStatus.PENDING: "inprogress", TaskStatus.PROCESSING: "inprogress",
                TaskStatus.COMPLETED: "succeed", TaskStatus.FAILED: "failed", TaskStatus.CANCELLED: "failed"}
CAPACITY_NOTE = ("sdqueue recorded this endpoint (a worker pool) and its desired replicas in Redis (hash sdq:pools); "
                 "it does not start machines. Capacity comes from the deployment: start workers with "
                 "`python -m worker.main --pool {name}` (compose: SDQ_WORKER_POOL={name}), or have an autoscaler "
                 "read sdq:pools. The endpoint is InService once a worker serves it; jobs sent before then wait in "
                 "its queue.")


# --- shapes ----------------------------------------------------------------------------
def gateway_error(status: int, detail: Any, headers: dict | None = None):
    """API Gateway answers throttling and auth itself, as {"message": ...}."""
    return json_error(status, {"message": detail}, headers)


def inference_error(status: int, detail: Any, headers: dict | None = None):
    if status == 429:
        return gateway_error(429, "Too Many Requests", headers)
    return error_response(status, detail, headers)


DIALECT_RENDERERS[BLUEPRINT] = inference_error


def forbidden():
    return gateway_error(403, "Forbidden")


def not_allowed():
    return gateway_error(403, "this API key may not use the AWS extension API")


def aws_time(epoch: float | None) -> str | None:
    """`str(datetime.now())` as the extension writes startTime/endTime (UTC)."""
    return None if epoch is None else datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def complete_time(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d-%H-%M-%S")


# --- inference jobs ------------------------------------------------------------------------
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
    """Presigned GET URLs of some of a job's objects once it succeeded, else [] (as the seed says: ask after succeed)."""
    svc = services()
    task = owned_job(svc, job_id)
    return jsonify([svc.storage.url_for(k) for k in keys(task)] if task.status is TaskStatus.COMPLETED else [])


def uploaded_asset(store: CheckpointStore, kind: str, name: str) -> dict[str, str]:
    """The file a worker must fetch for an Active upload of `kind` called `name`; LookupError says why not."""
    checkpoint = store.find_active(kind, name)
    if checkpoint is None:
        raise LookupError(f"checkpoint with name {name}, type {kind} is not found")
    if not name.endswith(WEIGHT_SUFFIXES):
        raise LookupError(f"{kind} {name} cannot be loaded: workers load {' or '.join(WEIGHT_SUFFIXES)} files")
    return checkpoint.asset(name)


def resolve_model(svc: Services, store: CheckpointStore, name: str) -> tuple[ModelInfo, list[dict]]:
    """A model in the model directory, else an Active uploaded checkpoint (fetched by the worker)."""
    model = find_checkpoint(svc, name)
    if model is not None:
        return model, []
    asset = uploaded_asset(store, "Stable-diffusion", name)
    return ModelInfo(asset["name"], svc.settings.models_dir / asset["name"], "single_file", 512), [asset]


def resolve_loras(svc: Services, store: CheckpointStore, names: list[str]) -> tuple[dict[str, str], list[dict]]:
    """LoRAs usable in the prompt's <lora:name:weight> tags (tag name -> local name) and the files to fetch."""
    local = svc.catalog.loras()
    usable, assets = {}, []
    for name in names:
        stem = name.rsplit(".", 1)[0] if "." in name else name
        if stem in local:
            usable[stem] = stem
            continue
        asset = uploaded_asset(store, "Lora", name)
        usable[stem] = asset["name"].rsplit(".", 1)[0]
        assets.append(asset)
    return usable, assets


def known_pool(svc: Services, name: str) -> bool:
    """A pool GPU workers serve or someone recorded (never the webhook queue)."""
    if name == svc.settings.callbacks.queue:
        return False
    return (name == svc.settings.tasks.queue or svc.pools.get(name) is not None
            or name in svc.workers.serving_queues())


def run_inference(svc: Services, raw: Any, schemas: tuple[Schema, Schema]):
    """POST /inference/v2: validate, translate, queue on the endpoint's pool; answer at once."""
    if not isinstance(raw, dict):
        return inference_error(400, "Malformed JSON body: a JSON object is required")
    txt2img, img2img = schemas
    schema = img2img if raw.get("task_type") == "img2img" else txt2img
    try:
        data = schema.load(raw)
    except ValidationError as exc:
        return inference_error(422, flatten_messages(exc.messages, ["body"]))
    pool = data["sagemaker_endpoint_name"]
    if not known_pool(svc, pool):
        return inference_error(400, f"endpoint {pool} not found; GET /endpoints lists them")
    if not current_key().may_use_pool(pool):
        return inference_error(403, f"this API key may not use endpoint {pool}")
    store = svc.checkpoints
    models = data["models"]
    try:
        model, assets = resolve_model(svc, store, models["Stable-diffusion"][0])
        loras, lora_assets = resolve_loras(svc, store, models.get("Lora") or [])
    except LookupError as exc:
        return inference_error(400, str(exc))
    if not current_key().may_use_model(model.name):
        return inference_error(403, f"this API key may not use model {model.name!r}")
    mode = data["task_type"]
    warnings = unhonoured(data, mode)
    if len(models["Stable-diffusion"]) > 1:
        warnings.append("models.Stable-diffusion: only the first checkpoint is used")
    warnings += [f"models.{kind}: not loaded by sdqueue (ignored)" for kind, names in models.items()
                 if names and kind not in ("Stable-diffusion", "Lora")]
    job_id = new_task_id()
    spec = build_a1111_jobspec(svc, data, mode, job_id, warnings, model=model, dialect=DIALECT,
                               extra_loras=frozenset(loras))
    spec.loras = [LoraRef(loras.get(lr.name, lr.name), lr.weight) for lr in spec.loras]
    spec.assets = assets + lora_assets
    spec.output_prefix, spec.output_stem, spec.output_format = output_prefix(svc, job_id), "image_", "jpeg"
    spec.sidecar_key = params_key(svc, job_id)
    spec.meta = {"task_type": mode, "warnings": warnings, "sidecar_style": "aws-params", "sidecar": {
        "parameters": echo_parameters(data), "endpont_name": pool, "endpoint_name": pool, "inference_id": job_id}}
    submit_job(svc, current_key().owner, spec, job_id, queue=pool)
    return jsonify({"inference_id": job_id, "status": "inprogress", "endpoint_name": pool,
                    "output_path": f"s3://{svc.storage.bucket}/{output_prefix(svc, job_id)}"})


# --- endpoints (worker pools) ---------------------------------------------------------------
def endpoint_views(svc: Services) -> list[dict]:
    """Every pool: recorded ones (with their desired replicas) and any queue a live worker serves."""
    pools = svc.pools
    serving = svc.workers.serving_queues()
    views = []
    for record in pools.desired():
        workers = serving.pop(record.name, [])
        if workers:
            record = pools.mark_in_service(record)
        views.append(pool_view(svc, record, len(workers)))
    for queue, workers in serving.items():
        if queue == svc.settings.callbacks.queue:
            continue
        since = min(w.started_at for w in workers)
        record = PoolRecord(queue, str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdqueue-pool:{queue}")), len(workers),
                            started_at=since, in_service_at=since, extra={"recorded": False})
        views.append(pool_view(svc, record, len(workers)))
    return views


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


def create_endpoint(svc: Services, data: dict) -> dict:
    pools = svc.pools
    job_id = str(uuid.uuid4())
    name = data["endpoint_name"] or f"infer-endpoint-{job_id[:7]}"
    record = pools.get(name) or PoolRecord(name, job_id, data["initial_instance_count"], owner=current_key().owner)
    if record.owner and record.owner != current_key().owner:
        abort(403, message=f"endpoint {name} belongs to another API key")
    record.replicas, record.instance_type = data["initial_instance_count"], data["instance_type"]
    record.extra["autoscaling"] = data["autoscaling_enabled"]
    pools.record(record)
    live = len(svc.workers.serving_queues().get(name, []))
    return {**pool_view(svc, record, live), "message": CAPACITY_NOTE.format(name=name)}


def delete_endpoints(svc: Services, names: list[str]):
    """Forget the caller's recorded pools; unknown names and other keys' pools are skipped (as the original skips)."""
    pools = svc.pools
    mine = [n for n in names if (p := pools.get(n)) is not None and p.owner in ("", current_key().owner)]
    pools.forget(mine)
    return jsonify("Endpoint deleted")


# --- the blueprint ---------------------------------------------------------------------------
def json_body(schema: Schema, description: str) -> dict:
    """An OpenAPI requestBody for views that pick their schema themselves."""
    return {"description": description, "required": True, "content": {"application/json": {"schema": schema}}}


def create_aws_inference_blueprint(settings, limits, keys) -> Blueprint:
    blp = Blueprint(BLUEPRINT, __name__, description="AWS extension middleware (seed 001): inference and endpoints")
    blp.before_request(keys.authenticator(DIALECT, bearer_token, forbidden, not_allowed))
    schemas = inference_schemas(settings)

    @blp.route("/inference/test-connection", methods=["GET"])
    @blp.doc(security=SECURITY)
    def test_connection():
        """Whether the client reaches the API with a valid key."""
        return jsonify({"message": "Success"})

    @blp.route("/inference/v2", methods=["POST"])
    @limits.submit
    @blp.doc(security=SECURITY, requestBody=json_body(schemas[0], "img2img adds init_images (and mask)"))
    def inference_v2():
        """Queue a txt2img/img2img job on the pool `sagemaker_endpoint_name` names; answers at once."""
        return run_inference(services(), request.get_json(silent=True), schemas)

    @blp.route("/inference/get-inference-job", methods=["GET"])
    @limits.read
    @blp.arguments(JobQuery(), location="query")
    @blp.doc(security=SECURITY)
    def get_inference_job(query: dict):
        """One job of this key: inprogress, succeed or failed, with image names once done."""
        return jsonify(job_view(owned_job(services(), query["jobID"])))

    @blp.route("/inference/list-inference-jobs", methods=["GET"])
    @limits.read
    @blp.doc(security=SECURITY)
    def list_inference_jobs():
        """This key's AWS-extension jobs, newest first (at most aws.list_limit)."""
        svc = services()
        tasks, _ = svc.store.list_owned(current_key().owner, 0, svc.settings.aws.list_limit)
        return jsonify([job_view(t) for t in tasks if t.spec.dialect == DIALECT])

    @blp.route("/inference/get-inference-job-image-output", methods=["GET"])
    @limits.read
    @blp.arguments(JobQuery(), location="query")
    @blp.doc(security=SECURITY)
    def image_output(query: dict):
        """Presigned GET URLs of a finished job's images ([] until it succeeds)."""
        return output_urls(query["jobID"], lambda task: task.result_keys)

    @blp.route("/inference/get-inference-job-param-output", methods=["GET"])
    @limits.read
    @blp.arguments(JobQuery(), location="query")
    @blp.doc(security=SECURITY)
    def param_output(query: dict):
        """A presigned GET URL of the job's params JSON (request, seeds, infotexts), once it succeeded."""
        return output_urls(query["jobID"], lambda task: [task.spec.sidecar_key] if task.spec.sidecar_key else [])

    @blp.route("/endpoints", methods=["GET"])
    @limits.read
    @blp.doc(security=SECURITY)
    def list_endpoints():
        """Worker pools: recorded ones and every queue a live worker serves (InService)."""
        return jsonify(endpoint_views(services()))

    @blp.route("/endpoints", methods=["POST"])
    @blp.doc(security=SECURITY, requestBody=json_body(EndpointCreate(), "or {\"delete_endpoint_list\": [...]}"))
    def post_endpoints():
        """Record a pool and its desired replicas; with `delete_endpoint_list`, forget pools (as the seed's samples do)."""
        raw = request.get_json(silent=True)
        if not isinstance(raw, dict):
            return inference_error(400, "Malformed JSON body: a JSON object is required")
        schema = EndpointDelete() if "delete_endpoint_list" in raw else EndpointCreate()
        try:
            data = schema.load(raw)
        except ValidationError as exc:
            return inference_error(422, flatten_messages(exc.messages, ["body"]))
        if "delete_endpoint_list" in data:
            return delete_endpoints(services(), data["delete_endpoint_list"])
        if data["endpoint_name"] == settings.callbacks.queue:
            return inference_error(422, flatten_messages(
                {"endpoint_name": [f"{data['endpoint_name']!r} is the webhook queue, not a worker pool"]}, ["body"]))
        return jsonify(create_endpoint(services(), data))

    @blp.route("/endpoints", methods=["DELETE"])
    @blp.arguments(EndpointDelete(), location="json")
    @blp.doc(security=SECURITY)
    def delete_endpoints_route(data: dict):
        """Forget recorded pools (their workers keep running until the deployment stops them)."""
        return delete_endpoints(services(), data["delete_endpoint_list"])

    @blp.route("/inference/get-endpoint-deployment-job", methods=["GET"])
    @limits.read
    @blp.arguments(JobQuery(), location="query")
    @blp.doc(security=SECURITY)
    def endpoint_deployment_job(query: dict):
        """One pool by its EndpointDeploymentJobId."""
        found = [v for v in endpoint_views(services()) if v["EndpointDeploymentJobId"] == query["jobID"]]
        if not found:
            return inference_error(404, f"endpoint deployment job {query['jobID']} not found")
        return jsonify(found[0])

    for path, kind in LIST_ROUTES.items():
        blp.add_url_rule(path, endpoint=path.rsplit("/", 1)[-1], methods=["GET"],
                         view_func=limits.read(model_list_view(kind)))
    return blp


LIST_ROUTES = {"/inference/get-lora-list": "Lora", "/inference/get-texual-inversion-list": "embeddings",
               "/inference/get-hypernetwork-list": "hypernetworks", "/inference/get-controlnet-model-list": "ControlNet"}


def model_list_view(kind: str):
    """A bare list of the file names of one model type: the LoRA directory's and every Active upload."""
    def view():
        svc = services()
        names = svc.checkpoints.active_names(kind)
        local = [path.name for path in svc.catalog.loras().values()] if kind == "Lora" else []
        return jsonify(local + [n for n in names if n not in local])
    view.__doc__ = f"File names of the {kind} models available"
    return view
