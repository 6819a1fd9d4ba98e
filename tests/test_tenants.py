"""Isolation between keys, as a rule: the tenant matrix.

Every route of every dialect that names an object a key owns (a task, an
AWS-extension job, a checkpoint or its file name, a pool, an SD on EKS
id_task or s3:// link, the A1111 options and current job) is called with key
B on key A's object and with key B on an object that does not exist: the two
answers must be the same (status, content type and body, the id aside). Key
A's own call is the control that the object is really there.

Routes come from the app's url_map: a new route fails
test_every_route_has_a_case until it gets a case here or is listed in
NO_OBJECT with the reason it names no object of a key.
"""
from __future__ import annotations

import io

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import redis
import requests
from PIL import Image

from api.auth import ApiKey
from api.dialects.eks.translate import eks_task_id
from common.store import keys
from tests.conftest import KEY_A, KEY_B, KEY_POOLED
from tests.helpers import FileServer, data_url, gradient, wait_until

OWNER_A, OWNER_B = ApiKey(KEY_A, "a").owner, ApiKey(KEY_B, "b").owner
FAST = {"steps": 2, "width": 64, "height": 64}
# Key A's uploads, one per type the model lists show; "reused" is the name key B uploads under its own id.
FILES = {"Stable-diffusion": "tenant-model.safetensors", "Lora": "tenant-style.safetensors",
         "embeddings": "tenant-embedding.safetensors", "hypernetworks": "tenant-hyper.safetensors",
         "ControlNet": "tenant-control.safetensors"}
REUSED = "tenant-reused.safetensors"
MISSING_FILE = "tenant-missing.safetensors"
POOL, MISSING_POOL = "tenant-a-pool", "tenant-missing-pool"
EKS_ID, EKS_I2I_ID = "tenant-shared-id", "tenant-i2i-id"
EKS_SCRIPTS = {"task": "text-to-image", "sd_model_checkpoint": "sdq-tiny", "uid": "u", "save_dir": "outputs"}

# Routes that name no object of a key: (method, rule) -> why.
NO_OBJECT = {
    ("GET", "/health"): "service health (no key): workers, no task ids",
    ("GET", "/api/health"): "the same as /health",
    ("GET", "/metrics"): "the operator's metrics (queue depths per pool, no ids)",
    ("GET", "/openapi.json"): "the API description",
    ("GET", "/docs"): "the API description",
    ("GET", "/redoc"): "the API description",
    ("GET", "/static/<path:filename>"): "Flask's static files",
    ("GET", "/ui/"): "the playground's static page, the same for everyone",
    ("GET", "/ui/<path:filename>"): "the playground's static files, the same for everyone",
    ("GET", "/api/v1/schedulers"): "a fixed list",
    ("POST", "/v1/draw"): "creates a task and answers it; names only a shared model",
    ("GET", "/inference/test-connection"): "a fixed answer",
    ("GET", "/sdapi/v1/sd-models"): "the shared model directory",
    ("GET", "/controlnet/model_list"): "the shared ControlNet directory",
    ("GET", "/controlnet/module_list"): "a fixed list",
    ("GET", "/controlnet/version"): "a fixed answer",
    ("GET", "/controlnet/settings"): "a fixed answer",
    ("GET", "/sdapi/v1/samplers"): "a fixed list",
    ("GET", "/sdapi/v1/schedulers"): "a fixed list",
    ("GET", "/sdapi/v1/sd-vae"): "a fixed list",
    ("GET", "/sdapi/v1/upscalers"): "a fixed list and the shared upscalers folder",
    ("GET", "/sdapi/v1/embeddings"): "the shared embeddings folder, for this key's own current model",
    ("GET", "/sdapi/v1/latent-upscale-modes"): "a fixed list",
    ("POST", "/sdapi/v1/extra-single-image"): "upscales the image in the body (a model upscaler's job and its "
                                              "stored inputs are the key's own: eks_id_task_and_links)",
    ("POST", "/sdapi/v1/extra-batch-images"): "upscales the images in the body (as extra-single-image)",
    ("GET", "/sdapi/v1/memory"): "the API host's RAM",
    ("GET", "/sdapi/v1/cmd-flags"): "a fixed set",
    ("POST", "/sdapi/v1/refresh-checkpoints"): "re-reads the shared model directory",
    ("POST", "/sdapi/v1/refresh-embeddings"): "a fixed answer",
    ("POST", "/sdapi/v1/png-info"): "reads the PNG in the body",
}
CASES: dict[tuple[str, str], Callable] = {}


def covers(*routes: tuple[str, str]) -> Callable:
    """Register a case as the one that proves these routes."""
    def register(case: Callable) -> Callable:
        for route in routes:
            CASES[route] = case
        return case
    return register


# --- calling and comparing ------------------------------------------------------------------
@dataclass
class Caller:
    base: str

    def __call__(self, method: str, path: str, key: str, headers: dict | None = None, **kw: Any) -> requests.Response:
        return requests.request(method, self.base + path, headers={"X-API-Key": key, **(headers or {})}, timeout=120,
                                **kw)


def normalised(response: requests.Response, ids: list[str]) -> tuple:
    """Status, content type and body with each id replaced by its place in `ids`."""
    text = response.text
    for n, value in enumerate(ids):
        text = text.replace(value, f"<id{n}>")
    try:
        body = json.loads(text)
    except ValueError:
        body = text
    return response.status_code, response.headers.get("Content-Type"), body


def assert_same(foreign: requests.Response, missing: requests.Response, foreign_ids: list[str],
                missing_ids: list[str]) -> None:
    """Another key's object answers exactly as a missing one."""
    assert normalised(foreign, foreign_ids) == normalised(missing, missing_ids), (foreign.text, missing.text)


def shape(value: Any) -> Any:
    """A JSON value's structure: keys and types, not contents."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__


def listed(storage, prefix: str) -> list[str]:
    found = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"] for o in found)


def fake_id() -> str:
    return str(uuid.uuid4())


# --- key A's objects ------------------------------------------------------------------------------
@dataclass
class World:
    """What key A made, for key B to name."""

    call: Caller
    storage: Any                     # the stack's common.storage.Storage
    task: str                        # a native task (completed)
    job: str                         # an AWS-extension job (succeeded, default pool)
    pool_job: str                    # A's pool's EndpointDeploymentJobId
    checkpoints: dict[str, dict]     # type -> A's Active checkpoint
    reused: dict                     # A's checkpoint whose file name B reuses
    eks_keys: dict[str, str]         # what -> S3 key of one of A's objects


def upload(call: Caller, key: str, kind: str, name: str, active: bool = True) -> dict:
    """POST /checkpoint, PUT the one part to its presigned URL, PUT /checkpoint Active."""
    r = call("POST", "/checkpoint", key, json={"checkpoint_type": kind, "filenames": [{"filename": name}]})
    assert r.status_code == 200, r.text
    created = r.json()
    if not active:
        return created["checkpoint"]
    put = requests.put(created["s3PresignUrl"][0]["urls"][0], data=b"tenant weights " * 64, timeout=30)
    assert put.status_code == 200, put.text
    r = call("PUT", "/checkpoint", key, json={"checkpoint_id": created["checkpoint"]["id"], "status": "Active"})
    assert r.status_code == 200, r.text
    return r.json()["checkpoint"]


def eks_body(id_task: str, **scripts: Any) -> dict:
    return {"prompt": "a tenant's dog", **FAST, "alwayson_scripts": {**EKS_SCRIPTS, "id_task": id_task, **scripts}}


@pytest.fixture(scope="module")
def world(stack, settings) -> World:
    from common.storage import Storage

    call, storage = Caller(stack.api_url), Storage(settings)
    r = call("POST", "/api/v1/generate", KEY_A, json={"prompt": "a tenant's fox", "width": 64, "height": 64,
                                                      "num_inference_steps": 2})
    assert r.status_code == 202, r.text
    task = r.json()["task_id"]
    r = call("POST", "/inference/v2", KEY_A, json={"task_type": "txt2img", "models": {"Stable-diffusion": ["sdq-tiny"]},
                                                  "sagemaker_endpoint_name": "gpu", "prompt": "a tenant's cat", **FAST})
    assert r.status_code == 200, r.text
    job = r.json()["inference_id"]
    r = call("POST", "/endpoints", KEY_A, json={"endpoint_name": POOL, "initial_instance_count": 0})
    assert r.status_code == 200, r.text
    pool_job = r.json()["EndpointDeploymentJobId"]
    checkpoints = {kind: upload(call, KEY_A, kind, name) for kind, name in FILES.items()}
    reused = upload(call, KEY_A, "Lora", REUSED, active=False)
    r = call("POST", "/", KEY_A, json=eks_body(EKS_ID))
    assert r.status_code == 200, r.text
    folder = r.json()["output_location"].split("/", 3)[3] + "/"   # where the answer says A's images go
    i2i = {**eks_body(EKS_I2I_ID, task="image-to-image"), "init_images": [data_url(gradient(64, 64))]}
    assert call("POST", "/", KEY_A, json=i2i).status_code == 200
    image, sidecar = wait_until(lambda: len(listed(storage, folder)) == 2 and listed(storage, folder),
                                what="A's SD on EKS outputs")
    (init,) = listed(storage, f"outputs/{eks_task_id(OWNER_A, EKS_I2I_ID)}/input/")
    r = call("POST", "/sdapi/v1/extra-single-image", KEY_A, json={"image": data_url(gradient(16, 16)),
                                                                 "upscaler_1": "sdq-tiny-esrgan-x4"})
    assert r.status_code == 200, r.text         # a model upscaler: a queued job with its image stored
    extras_task = redis.Redis.from_url(settings.redis.url).get(keys.A1111_CURRENT(OWNER_A)).decode()
    (extras_input,) = listed(storage, f"outputs/{extras_task}/input/")
    lora = checkpoints["Lora"]
    eks_keys = {"image": image, "side file": sidecar, "init image": init, "extras input": extras_input,
                "checkpoint file": f"{lora['s3_location'].split('/', 3)[3]}/{FILES['Lora']}"}
    wait_until(lambda: call("GET", f"/api/v1/tasks/{task}?wait=5", KEY_A).json()["status"] == "completed",
               what="A's native task")
    wait_until(lambda: call("GET", "/inference/get-inference-job", KEY_A, params={"jobID": job}).json()["status"]
               == "succeed", what="A's AWS job")
    return World(call, storage, task, job, pool_job, checkpoints, reused, eks_keys)


# --- the cases ------------------------------------------------------------------------------------
@covers(("GET", "/api/v1/tasks/<string:task_id>"), ("DELETE", "/api/v1/tasks/<string:task_id>"),
        ("GET", "/api/v1/tasks"), ("GET", "/api/v1/tasks/<string:task_id>/events"))
def native_tasks(w: World) -> None:
    """A task id of another key: 404 as an unknown id, on read, cancel and its event stream; never listed."""
    missing = fake_id()
    for method in ("GET", "DELETE"):
        assert_same(w.call(method, f"/api/v1/tasks/{w.task}", KEY_B), w.call(method, f"/api/v1/tasks/{missing}", KEY_B),
                    [w.task], [missing])
    assert_same(w.call("GET", f"/api/v1/tasks/{w.task}/events", KEY_B),
                w.call("GET", f"/api/v1/tasks/{missing}/events", KEY_B), [w.task], [missing])
    assert w.call("GET", f"/api/v1/tasks/{w.task}", KEY_A).json()["status"] == "completed"
    assert w.task not in {t["task_id"] for t in w.call("GET", "/api/v1/tasks?limit=100", KEY_B).json()["tasks"]}
    assert w.task in {t["task_id"] for t in w.call("GET", "/api/v1/tasks?limit=100", KEY_A).json()["tasks"]}


@covers(("POST", "/api/v1/generate"))
def native_idempotency_keys(w: World) -> None:
    """Another key's Idempotency-Key is a new one for this key: a new task, never A's replay or its 422."""
    body = {"prompt": "a tenant's retried fox", "width": 64, "height": 64, "num_inference_steps": 2}

    def submit(key: str, idempotency: str, **changes: Any) -> requests.Response:
        return w.call("POST", "/api/v1/generate", key, headers={"Idempotency-Key": idempotency},
                      json={**body, **changes})

    for changes in ({}, {"prompt": "another body"}):   # for A: the same body is a replay, another a 422
        mine, fresh = f"tenant-idem-{uuid.uuid4().hex}", f"tenant-idem-{uuid.uuid4().hex}"
        first = submit(KEY_A, mine)
        assert first.status_code == 202 and submit(KEY_A, mine).headers.get("Idempotent-Replayed") == "true"
        foreign, new = submit(KEY_B, mine, **changes), submit(KEY_B, fresh, **changes)
        ids = [foreign.json().get("task_id", "-"), new.json().get("task_id", "-")]
        assert foreign.status_code == 202 and ids[0] != first.json()["task_id"], foreign.text
        assert normalised(foreign, ids[:1]) == normalised(new, ids[1:])
        assert "Idempotent-Replayed" not in foreign.headers
    # A's own checkpoint as `model`: for B, the same 422 as a file name nobody uploaded.
    model, missing = FILES["Stable-diffusion"], MISSING_FILE
    assert_same(w.call("POST", "/api/v1/generate", KEY_B, json={**body, "model": model}),
                w.call("POST", "/api/v1/generate", KEY_B, json={**body, "model": missing}), [model], [missing])


@covers(("GET", "/inference/get-inference-job"), ("GET", "/inference/get-inference-job-image-output"),
        ("GET", "/inference/get-inference-job-param-output"), ("GET", "/inference/list-inference-jobs"))
def aws_jobs(w: World) -> None:
    """A jobID of another key: the same 404 on every job route; never listed."""
    missing = fake_id()
    for path in ("get-inference-job", "get-inference-job-image-output", "get-inference-job-param-output"):
        route = f"/inference/{path}"
        assert_same(w.call("GET", route, KEY_B, params={"jobID": w.job}),
                    w.call("GET", route, KEY_B, params={"jobID": missing}), [w.job], [missing])
        assert w.call("GET", route, KEY_A, params={"jobID": w.job}).status_code == 200
    assert w.job not in {j["InferenceJobId"] for j in w.call("GET", "/inference/list-inference-jobs", KEY_B).json()}
    assert w.job in {j["InferenceJobId"] for j in w.call("GET", "/inference/list-inference-jobs", KEY_A).json()}


@covers(("POST", "/inference/v2"))
def aws_inference_names(w: World) -> None:
    """Another key's pool, checkpoint or LoRA named in /inference/v2: "not found" as a missing name."""
    body = {"task_type": "txt2img", "models": {"Stable-diffusion": ["sdq-tiny"]}, "sagemaker_endpoint_name": "gpu",
            "prompt": "x", **FAST}
    sd, lora = FILES["Stable-diffusion"], FILES["Lora"]
    pairs = [  # (A's name, a missing name, the body naming it)
        (POOL, MISSING_POOL, lambda name: {**body, "sagemaker_endpoint_name": name}),
        (sd, MISSING_FILE, lambda name: {**body, "models": {"Stable-diffusion": [name]}}),
        (lora, MISSING_FILE, lambda name: {**body, "models": {"Stable-diffusion": ["sdq-tiny"], "Lora": [name]}}),
    ]
    for mine, missing, naming in pairs:
        for key in (KEY_B, KEY_POOLED):   # KEY_POOLED may use only "gpu": still "not found", never its 403
            assert_same(w.call("POST", "/inference/v2", key, json=naming(mine)),
                        w.call("POST", "/inference/v2", key, json=naming(missing)), [mine], [missing])
    own = {**body, "sagemaker_endpoint_name": POOL, "models": {"Stable-diffusion": [sd], "Lora": [lora]}}
    r = w.call("POST", "/inference/v2", KEY_A, json=own)   # A's pool has no worker: the job waits; cancel it
    assert r.status_code == 200, r.text
    assert w.call("DELETE", f"/api/v1/tasks/{r.json()['inference_id']}", KEY_A).status_code == 200


@covers(("GET", "/endpoints"), ("POST", "/endpoints"), ("DELETE", "/endpoints"),
        ("GET", "/inference/get-endpoint-deployment-job"))
def aws_pools(w: World) -> None:
    """Another key's pool: not listed, not found by its job id, not deleted, not re-recorded."""
    def names(key: str) -> set[str]:
        return {v["endpoint_name"] for v in w.call("GET", "/endpoints", key).json()}

    assert POOL in names(KEY_A) and POOL not in names(KEY_B) and "gpu" in names(KEY_B)
    missing = fake_id()
    route = "/inference/get-endpoint-deployment-job"
    assert_same(w.call("GET", route, KEY_B, params={"jobID": w.pool_job}),
                w.call("GET", route, KEY_B, params={"jobID": missing}), [w.pool_job], [missing])
    assert w.call("GET", route, KEY_A, params={"jobID": w.pool_job}).status_code == 200
    for method in ("POST", "DELETE"):   # forgetting another key's pool: skipped, as a missing one
        assert_same(w.call(method, "/endpoints", KEY_B, json={"delete_endpoint_list": [POOL]}),
                    w.call(method, "/endpoints", KEY_B, json={"delete_endpoint_list": [MISSING_POOL]}),
                    [POOL], [MISSING_POOL])
    # Recording a name another key holds: pool names are queue names, one namespace; refused as a shared name is.
    assert_same(w.call("POST", "/endpoints", KEY_B, json={"endpoint_name": POOL, "initial_instance_count": 5}),
                w.call("POST", "/endpoints", KEY_B, json={"endpoint_name": "gpu", "initial_instance_count": 5}),
                [POOL], ["gpu"])
    mine = next(v for v in w.call("GET", "/endpoints", KEY_A).json() if v["endpoint_name"] == POOL)
    assert mine["desired_instance_count"] == 0 and mine["EndpointDeploymentJobId"] == w.pool_job


@covers(("GET", "/checkpoint"), ("PUT", "/checkpoint"), ("GET", "/checkpoints"))
def aws_checkpoints(w: World) -> None:
    """Another key's checkpoint id: the same 404 on GET and PUT, unchanged, never listed."""
    missing = fake_id()
    for checkpoint in [*w.checkpoints.values(), w.reused]:
        mine = checkpoint["id"]
        for params in ({"id": mine}, {"checkpoint_id": mine}):
            twin = {name: missing for name in params}
            assert_same(w.call("GET", "/checkpoint", KEY_B, params=params),
                        w.call("GET", "/checkpoint", KEY_B, params=twin), [mine], [missing])
        for status in ("Disabled", "Active"):
            assert_same(w.call("PUT", "/checkpoint", KEY_B, json={"checkpoint_id": mine, "status": status}),
                        w.call("PUT", "/checkpoint", KEY_B, json={"checkpoint_id": missing, "status": status}),
                        [mine], [missing])
        assert w.call("GET", "/checkpoint", KEY_A, params={"id": mine}).json()["checkpoint"]["status"] == \
            checkpoint["status"]   # B changed nothing
    ids_b = {c["id"] for c in w.call("GET", "/checkpoints", KEY_B).json()["checkpoints"]}
    ids_a = {c["id"] for c in w.call("GET", "/checkpoints", KEY_A).json()["checkpoints"]}
    ours = {c["id"] for c in [*w.checkpoints.values(), w.reused]}
    assert not ours & ids_b and ours <= ids_a


@covers(("POST", "/checkpoint"), ("POST", "/upload_checkpoint"))
def aws_file_names_are_per_key(w: World) -> None:
    """Another key's file name is free for this one: the same answer as a name nobody has."""
    fresh = f"tenant-fresh-{uuid.uuid4().hex[:8]}.safetensors"

    def create(name: str) -> requests.Response:
        return w.call("POST", "/checkpoint", KEY_B, json={"checkpoint_type": "Lora", "filenames": [{"filename": name}]})

    def same_shape(taken: requests.Response, new: requests.Response, name: str) -> None:
        """The same answer as for a name nobody has (ids and URLs differ: compare the structure)."""
        assert taken.status_code == new.status_code == 200, (taken.text, new.text)
        assert shape(normalised(taken, [REUSED])[2]) == shape(normalised(new, [name])[2])

    taken, new = create(REUSED), create(fresh)
    same_shape(taken, new, fresh)
    assert taken.json()["checkpoint"]["id"] != w.reused["id"]
    again = f"tenant-fresh-{uuid.uuid4().hex[:8]}.safetensors"
    server = FileServer({f"/files/{REUSED}": b"b's own " * 64, f"/files/{again}": b"b's own " * 64}, {})
    try:
        def fetched(name: str) -> requests.Response:
            return w.call("POST", "/upload_checkpoint", KEY_B,
                          json={"checkpointType": "Lora", "modelUrl": [server.url(f"/files/{name}")], "params": {}})

        taken, new = fetched(REUSED), fetched(again)
    finally:
        server.close()
    same_shape(taken, new, again)
    assert w.call("GET", "/checkpoint", KEY_A, params={"id": w.reused["id"]}).json()["checkpoint"]["name"] == [REUSED]


@covers(("GET", "/inference/get-lora-list"), ("GET", "/inference/get-texual-inversion-list"),
        ("GET", "/inference/get-hypernetwork-list"), ("GET", "/inference/get-controlnet-model-list"))
def aws_model_lists(w: World) -> None:
    """The model lists show this key's uploads only."""
    lists = {"get-lora-list": "Lora", "get-texual-inversion-list": "embeddings",
             "get-hypernetwork-list": "hypernetworks", "get-controlnet-model-list": "ControlNet"}
    for path, kind in lists.items():
        assert FILES[kind] in w.call("GET", f"/inference/{path}", KEY_A).json()
        assert FILES[kind] not in w.call("GET", f"/inference/{path}", KEY_B).json()


@covers(("POST", "/"))
def eks_id_task_and_links(w: World) -> None:
    """Another key's id_task is a new job in the caller's folder; links to its objects are "no such object"."""
    storage, bucket = w.storage, w.storage.bucket
    # The same id_task: B's own job, in B's folder, answered as any new id_task of B's.
    fresh = f"tenant-fresh-{uuid.uuid4().hex[:8]}"
    a_image = storage.get(w.eks_keys["image"])
    same, new = w.call("POST", "/", KEY_B, json=eks_body(EKS_ID)), w.call("POST", "/", KEY_B, json=eks_body(fresh))
    assert normalised(same, [EKS_ID]) == normalised(new, [fresh])
    assert same.json()["output_location"] == f"s3://{bucket}/outputs/{OWNER_B}/{EKS_ID}"
    again = w.call("POST", "/", KEY_A, json=eks_body(EKS_ID, save_dir="elsewhere"))   # a resubmission: its folder
    assert again.json()["output_location"] == f"s3://{bucket}/outputs/{OWNER_A}/{EKS_ID}"
    wait_until(lambda: len(listed(storage, f"outputs/{OWNER_B}/{EKS_ID}/")) == 2, what="B's outputs")
    assert storage.get(w.eks_keys["image"]) == a_image and len(listed(storage, f"outputs/{OWNER_A}/{EKS_ID}/")) == 2

    # s3:// links to A's objects: no such object for B, as a missing one.
    def linked(key: str, link: str) -> requests.Response:
        body = {**eks_body("tenant-link", task="image-to-image", image_link=link)}
        return w.call("POST", "/", key, json=body)

    for what, key in w.eks_keys.items():
        mine = f"s3://{bucket}/{key}"
        missing = f"s3://{bucket}/{key.rsplit('/', 1)[0]}/missing-{uuid.uuid4().hex[:6]}.png"
        foreign, absent = linked(KEY_B, mine), linked(KEY_B, missing)
        assert foreign.status_code == 400, (what, foreign.text)
        assert_same(foreign, absent, [mine], [missing])
    assert linked(KEY_A, f"s3://{bucket}/{w.eks_keys['init image']}").status_code == 200   # A reads its own


@covers(("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/interrupt"), ("POST", "/sdapi/v1/skip"))
def a1111_current_job(w: World) -> None:
    """/progress, /interrupt and /skip answer as if another key's running job did not exist, and leave it be."""
    progress = lambda key: w.call("GET", "/sdapi/v1/progress", key)   # noqa: E731
    before = {p: w.call("POST", f"/sdapi/v1/{p}", KEY_B).json() for p in ("interrupt", "skip")}
    idle_b, idle_other = progress(KEY_B).json(), progress(KEY_POOLED).json()   # KEY_POOLED never used A1111
    result: dict = {}
    slow = {"prompt": "a tenant's slow harbour", "steps": 150, "width": 256, "height": 256}
    runner = threading.Thread(target=lambda: result.update(r=w.call("POST", "/sdapi/v1/txt2img", KEY_A, json=slow)))
    runner.start()
    try:
        wait_until(lambda: progress(KEY_A).json()["state"]["job_count"] == 1, what="A's job")
        during = progress(KEY_B).json()
        stopped = {p: w.call("POST", f"/sdapi/v1/{p}", KEY_B).json() for p in ("interrupt", "skip")}
        a_state = progress(KEY_A).json()["state"]
        assert a_state["job_count"] == 1 and a_state["interrupted"] is False   # B neither saw nor stopped it
        assert during == idle_b and shape(during) == shape(idle_other) and stopped == before
    finally:
        w.call("POST", "/sdapi/v1/interrupt", KEY_A)
        runner.join(120)
    assert json.loads(result["r"].json()["info"])["interrupted"] is True   # A's own interrupt reached it


@covers(("GET", "/sdapi/v1/options"), ("POST", "/sdapi/v1/options"))
def a1111_options(w: World) -> None:
    """Another key's /options never show."""
    marker = {"tenant_marker": uuid.uuid4().hex}
    before = w.call("GET", "/sdapi/v1/options", KEY_B).json()
    assert w.call("POST", "/sdapi/v1/options", KEY_A, json=marker).status_code == 200
    assert w.call("GET", "/sdapi/v1/options", KEY_A).json()["tenant_marker"] == marker["tenant_marker"]
    assert w.call("GET", "/sdapi/v1/options", KEY_B).json() == before


@covers(("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/img2img"))
def a1111_saved_copies(w: World) -> None:
    """save_images copies land in each key's own folder, numbered on their own."""
    storage = w.storage
    body = {"prompt": "a tenant's copy", **FAST, "save_images": True, "send_images": False}
    bodies = {"txt2img": body, "img2img": {**body, "steps": 4, "init_images": [data_url(gradient(64, 64))]}}
    day = time.strftime("%Y-%m-%d")
    for mode, request in bodies.items():
        seeds = {}
        for key, owner in ((KEY_A, OWNER_A), (KEY_B, OWNER_B)):
            r = w.call("POST", f"/sdapi/v1/{mode}", key, json=request)
            assert r.status_code == 200, r.text
            seeds[owner] = json.loads(r.json()["info"])["all_seeds"][0]
        for owner, seed in seeds.items():
            names = [k.rsplit("/", 1)[1] for k in listed(storage, f"outputs/{mode}-images/{owner}/{day}/")]
            assert any(n.endswith(f"-{seed}.png") for n in names), (owner, names)
            other = next(s for o, s in seeds.items() if o != owner)
            assert not any(n.endswith(f"-{other}.png") for n in names)   # never among another key's copies


@covers(("POST", "/dataset"), ("PUT", "/dataset"), ("GET", "/datasets"), ("GET", "/<string:dataset_name>/data"))
def aws_datasets(w: World) -> None:
    """Another key's dataset answers as a missing one (data, status change), is never listed, and its name is
    free for this key (names are per key)."""
    name, missing = f"tenant-{fake_id()[:8]}", f"tenant-{fake_id()[:8]}"
    content = [{"filename": "a.png", "name": "a.png", "type": "png"}]
    assert w.call("POST", "/dataset", KEY_A, json={"dataset_name": name, "content": content}).status_code == 200
    assert_same(w.call("GET", f"/{name}/data", KEY_B), w.call("GET", f"/{missing}/data", KEY_B), [name], [missing])
    assert_same(w.call("PUT", "/dataset", KEY_B, json={"dataset_name": name, "status": "Disabled"}),
                w.call("PUT", "/dataset", KEY_B, json={"dataset_name": missing, "status": "Disabled"}), [name], [missing])
    assert name not in {d["datasetName"] for d in w.call("GET", "/datasets", KEY_B).json()["datasets"]}
    assert name in {d["datasetName"] for d in w.call("GET", "/datasets", KEY_A).json()["datasets"]}
    assert w.call("POST", "/dataset", KEY_B, json={"dataset_name": name, "content": content}).status_code == 200
    assert w.call("GET", f"/{name}/data", KEY_A).json()["data"][0]["key"] != \
        w.call("GET", f"/{name}/data", KEY_B).json()["data"][0]["key"]


@covers(("GET", "/api/v1/models"))
def key_models(w: World) -> None:
    """The shared model directory for everyone; a key's own checkpoints (uploads, merges) for it alone."""
    mine = {m["name"] for m in w.call("GET", "/api/v1/models", KEY_A).json()["own"]}
    theirs = w.call("GET", "/api/v1/models", KEY_B).json()
    assert FILES["Stable-diffusion"] in mine and FILES["Stable-diffusion"] not in {m["name"] for m in theirs["own"]}
    assert {m["name"] for m in theirs["models"]} == {m["name"] for m in
                                                     w.call("GET", "/api/v1/models", KEY_A).json()["models"]}


@covers(("GET", "/api/v1/loras"), ("GET", "/sdapi/v1/loras"), ("DELETE", "/api/v1/loras/<string:name>"))
def key_loras(w: World) -> None:
    """Another key's own LoRA (uploaded or trained) is never listed, cannot be deleted (the 404 of a missing name)
    and is unknown to a native request (the 422 of a missing name)."""
    stem, missing = FILES["Lora"].removesuffix(".safetensors"), MISSING_FILE.removesuffix(".safetensors")

    def listed(key: str) -> tuple[set, set]:
        native = {entry["name"] for entry in w.call("GET", "/api/v1/loras", key).json()["loras"]}
        return native, {entry["name"] for entry in w.call("GET", "/sdapi/v1/loras", key).json()}

    assert all(stem in names for names in listed(KEY_A)) and not any(stem in names for names in listed(KEY_B))
    assert_same(w.call("DELETE", f"/api/v1/loras/{stem}", KEY_B), w.call("DELETE", f"/api/v1/loras/{missing}", KEY_B),
                [stem], [missing])
    body = {"prompt": "a tenant's fox", "width": 64, "height": 64, "num_inference_steps": 2}
    assert_same(w.call("POST", "/api/v1/generate", KEY_B, json={**body, "loras": [{"name": stem}]}),
                w.call("POST", "/api/v1/generate", KEY_B, json={**body, "loras": [{"name": missing}]}), [stem], [missing])
    assert all(stem in names for names in listed(KEY_A))           # B's delete changed nothing


@covers(("POST", "/api/v1/trainings"), ("GET", "/api/v1/trainings"), ("GET", "/api/v1/trainings/<string:task_id>"),
        ("DELETE", "/api/v1/trainings/<string:task_id>"))
def native_trainings(w: World) -> None:
    """Another key's training job answers as a missing one (view, cancel), is never listed, and another key's
    dataset cannot be trained on (the same 404 as a missing dataset)."""
    name, missing = f"tenant-t-{fake_id()[:8]}", f"tenant-t-{fake_id()[:8]}"
    created = w.call("POST", "/api/v1/datasets", KEY_A, json={"name": name, "files": [{"name": "a.png"}]}).json()
    image = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image, "PNG")
    assert requests.put(created["files"][0]["upload_url"], data=image.getvalue(), timeout=30).status_code == 200
    assert w.call("POST", f"/api/v1/datasets/{name}/enable", KEY_A).status_code == 200
    assert_same(w.call("POST", "/api/v1/trainings", KEY_B, json={"dataset": name}),
                w.call("POST", "/api/v1/trainings", KEY_B, json={"dataset": missing}), [name], [missing])
    job = w.call("POST", "/api/v1/trainings", KEY_A, json={"dataset": name, "max_steps": 1, "resolution": 64})
    assert job.status_code == 202, job.text
    job_id, absent = job.json()["id"], fake_id()
    for method in ("GET", "DELETE"):
        assert_same(w.call(method, f"/api/v1/trainings/{job_id}", KEY_B),
                    w.call(method, f"/api/v1/trainings/{absent}", KEY_B), [job_id], [absent])
    assert job_id not in {t["id"] for t in w.call("GET", "/api/v1/trainings", KEY_B).json()["trainings"]}
    assert job_id in {t["id"] for t in w.call("GET", "/api/v1/trainings", KEY_A).json()["trainings"]}
    assert w.call("DELETE", f"/api/v1/trainings/{job_id}", KEY_A).status_code in (200, 202, 409)   # not left queued


@covers(("POST", "/api/v1/merges"), ("GET", "/api/v1/merges"), ("GET", "/api/v1/merges/<string:task_id>"),
        ("DELETE", "/api/v1/merges/<string:task_id>"), ("POST", "/inference/run-model-merge"))
def model_merges(w: World) -> None:
    """Another key's checkpoint named in a merge (native or AWS) answers as a missing name; another key's merge
    answers as a missing one (view, cancel) and is never listed."""
    mine = FILES["Stable-diffusion"]
    for role in ("primary", "secondary"):
        body = {"primary": "sdq-tiny", "secondary": "tiny-single.safetensors"}
        assert_same(w.call("POST", "/api/v1/merges", KEY_B, json={**body, role: mine}),
                    w.call("POST", "/api/v1/merges", KEY_B, json={**body, role: MISSING_FILE}), [mine], [MISSING_FILE])
        aws = {"primary_model_name": "sdq-tiny", "secondary_model_name": "tiny-single.safetensors"}
        field = f"{role}_model_name"
        assert_same(w.call("POST", "/inference/run-model-merge", KEY_B, json={**aws, field: mine}),
                    w.call("POST", "/inference/run-model-merge", KEY_B, json={**aws, field: MISSING_FILE}),
                    [mine], [MISSING_FILE])
    job = w.call("POST", "/api/v1/merges", KEY_A, json={"primary": "sdq-tiny", "secondary": "tiny-single.safetensors",
                                                        "name": f"tenant-merge-{fake_id()[:8]}"})
    assert job.status_code == 202, job.text
    job_id, absent = job.json()["id"], fake_id()
    for method in ("GET", "DELETE"):
        assert_same(w.call(method, f"/api/v1/merges/{job_id}", KEY_B),
                    w.call(method, f"/api/v1/merges/{absent}", KEY_B), [job_id], [absent])
    assert job_id not in {m["id"] for m in w.call("GET", "/api/v1/merges", KEY_B).json()["merges"]}
    assert job_id in {m["id"] for m in w.call("GET", "/api/v1/merges", KEY_A).json()["merges"]}
    assert w.call("DELETE", f"/api/v1/merges/{job_id}", KEY_A).status_code in (200, 202, 409)   # not left queued


@covers(("POST", "/api/v1/datasets"), ("GET", "/api/v1/datasets"), ("GET", "/api/v1/datasets/<string:name>"),
        ("POST", "/api/v1/datasets/<string:name>/enable"), ("DELETE", "/api/v1/datasets/<string:name>"))
def native_datasets(w: World) -> None:
    """The native face of the same datasets: another key's answers as a missing one and is never listed."""
    name, missing = f"tenant-n-{fake_id()[:8]}", f"tenant-n-{fake_id()[:8]}"
    assert w.call("POST", "/api/v1/datasets", KEY_A, json={"name": name, "files": [{"name": "a.png"}]}).status_code == 201
    for method, path in (("GET", "/api/v1/datasets/{}"), ("POST", "/api/v1/datasets/{}/enable"),
                         ("DELETE", "/api/v1/datasets/{}")):
        assert_same(w.call(method, path.format(name), KEY_B), w.call(method, path.format(missing), KEY_B),
                    [name], [missing])
    assert name not in {d["name"] for d in w.call("GET", "/api/v1/datasets", KEY_B).json()["datasets"]}
    assert name in {d["name"] for d in w.call("GET", "/api/v1/datasets", KEY_A).json()["datasets"]}   # not deleted


def enabled_aws_dataset(w: World, key: str, name: str) -> str:
    """An Enabled dataset of `key` made through the AWS extension's routes; its s3 location."""
    content = [{"filename": "a.png", "name": "a.png", "type": "png"}]
    created = w.call("POST", "/dataset", key, json={"dataset_name": name, "content": content})
    assert created.status_code == 200, created.text
    image = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 200, 30)).save(image, "PNG")
    assert requests.put(created.json()["s3PresignUrl"]["a.png"], data=image.getvalue(), timeout=30).status_code == 200
    assert w.call("PUT", "/dataset", key, json={"dataset_name": name, "status": "Enabled"}).status_code == 200
    return next(d["s3"] for d in w.call("GET", "/datasets", key).json()["datasets"] if d["datasetName"] == name)


def train_body(data: str, model_id: str | None = None) -> dict:
    body = {"train_type": "Stable-diffusion", "params": {
        "training_params": {"data_tar_list": [data], "class_data_tar_list": [""]},
        "config_params": {"concepts_list": [{"instance_prompt": "sks"}], "num_train_epochs": 1, "resolution": 64}}}
    return {**body, "model_id": model_id} if model_id else body


@covers(("POST", "/train"), ("PUT", "/train"), ("GET", "/trains"), ("PUT", "/inference/v2/<string:job_id>/run"))
def aws_train_jobs(w: World) -> None:
    """Another key's training job, dataset (by s3 location or name) or model answers as a missing one when named
    in the AWS extension's training routes; its jobs are never listed; PUT /inference/v2/{id}/run on another key's
    inference job is the same 404 as on a missing one."""
    name, missing = f"tenant-tr-{fake_id()[:8]}", f"tenant-tr-{fake_id()[:8]}"
    s3 = enabled_aws_dataset(w, KEY_A, name)
    twin = s3[: -len(name)] + missing                    # the same place, a name A does not have
    model = w.call("POST", "/model", KEY_A, json={"model_type": "Stable-diffusion", "name": "tenant-base",
                                                  "params": {"create_model_params": {"ckpt_path": "sdq-tiny"}}})
    assert model.json()["job"]["status"] == "Complete", model.text
    model_id, absent = model.json()["job"]["id"], fake_id()
    created = w.call("POST", "/train", KEY_A, json=train_body(s3, model_id))
    assert created.status_code == 200, created.text
    job = created.json()["job"]["id"]                    # left Initial: nothing is queued
    own = enabled_aws_dataset(w, KEY_B, f"tenant-trb-{fake_id()[:8]}")   # B's: its model_id is what is checked
    for method, route in (("POST", "/train"), ("PUT", f"/inference/v2/{fake_id()}/run")):
        pairs = [(s3, twin, lambda data: train_body(data)), (name, missing, lambda data: train_body(data)),
                 (model_id, absent, lambda model: train_body(own, model))]
        for theirs, nobody, naming in pairs:
            assert_same(w.call(method, route, KEY_B, json=naming(theirs)),
                        w.call(method, route, KEY_B, json=naming(nobody)), [theirs], [nobody])
    for status in ("Training", "Stopped"):
        assert_same(w.call("PUT", "/train", KEY_B, json={"train_job_id": job, "status": status}),
                    w.call("PUT", "/train", KEY_B, json={"train_job_id": absent, "status": status}), [job], [absent])
    assert job not in {j["id"] for j in w.call("GET", "/trains", KEY_B).json()["trainJobs"]}
    mine = {j["id"]: j for j in w.call("GET", "/trains", KEY_A).json()["trainJobs"]}
    assert mine[job]["status"] == "Initial"                      # B started nothing
    missing_job = fake_id()
    assert_same(w.call("PUT", f"/inference/v2/{w.job}/run", KEY_B), w.call("PUT", f"/inference/v2/{missing_job}/run", KEY_B),
                [w.job], [missing_job])
    assert w.call("PUT", f"/inference/v2/{w.job}/run", KEY_A).json()["status"] == "succeed"


@covers(("POST", "/model"), ("PUT", "/model"), ("GET", "/models"))
def aws_models(w: World) -> None:
    """Another key's model answers as a missing one (PUT /model), is never listed; another key's checkpoint, by
    id or file name, cannot become this key's model (the same 400 as a missing one)."""
    sd = w.checkpoints["Stable-diffusion"]
    mine = w.call("POST", "/model", KEY_A, json={"model_type": "Stable-diffusion", "name": "tenant-upload",
                                                 "filenames": [{"filename": "tenant.tar"}]})
    assert mine.status_code == 200, mine.text
    model, absent = mine.json()["job"]["id"], fake_id()
    for status in ("Creating", "Fail"):
        assert_same(w.call("PUT", "/model", KEY_B, json={"model_id": model, "status": status}),
                    w.call("PUT", "/model", KEY_B, json={"model_id": absent, "status": status}), [model], [absent])
    missing = fake_id()

    def naming(**source: Any) -> requests.Response:
        return w.call("POST", "/model", KEY_B, json={"model_type": "Stable-diffusion", "name": "tenant-b", **source})

    assert_same(naming(checkpoint_id=sd["id"]), naming(checkpoint_id=missing), [sd["id"]], [missing])
    assert_same(naming(params={"create_model_params": {"ckpt_path": FILES["Stable-diffusion"]}}),
                naming(params={"create_model_params": {"ckpt_path": MISSING_FILE}}),
                [FILES["Stable-diffusion"]], [MISSING_FILE])
    assert model not in {m["id"] for m in w.call("GET", "/models", KEY_B).json()["models"]}
    listed = {m["id"]: m for m in w.call("GET", "/models", KEY_A).json()["models"]}
    assert listed[model]["status"] == "Initial"                  # B changed nothing
    by_file = w.call("POST", "/model", KEY_A, json={"model_type": "Stable-diffusion", "name": "tenant-named",
                                                    "params": {"create_model_params": {"ckpt_path": FILES["Stable-diffusion"]}}})
    assert by_file.json()["job"]["status"] == "Complete", by_file.text   # A's own file is usable by A


# --- the tests (after every case: parametrize reads CASE_LIST when it is declared) ----------------------
CASE_LIST = list(dict.fromkeys(CASES.values()))


def test_every_route_has_a_case(stack):
    """Every route of the app is either proved by a case or listed as naming no object of a key."""
    from api import create_app
    from common.settings import load_settings

    app = create_app(load_settings(env=stack.env()))
    routes = {(method, rule.rule) for rule in app.url_map.iter_rules()
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert not set(CASES) & set(NO_OBJECT)
    assert routes - set(CASES) - set(NO_OBJECT) == set(), "a route without a tenant-matrix case (or NO_OBJECT entry)"
    assert (set(CASES) | set(NO_OBJECT)) - routes == set(), "stale entries: these routes are gone"


@pytest.mark.parametrize("case", CASE_LIST, ids=lambda case: case.__name__)
def test_another_keys_object_answers_as_a_missing_one(case, world):
    case(world)
