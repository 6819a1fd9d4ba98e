"""The AWS SD extension API against the real stack: its documented examples as written
(base URL and key substituted, placeholders filled), a worker pool of its own, checkpoints in S3."""
from __future__ import annotations

import io
import json
import shutil
import time

import pytest
import requests
from PIL import Image

from tests.conftest import KEY_A, KEY_B, KEY_LIMITED, KEY_NATIVE_ONLY, KEY_POOLED
from tests.helpers import FileServer, fetch

POOL = "infer-endpoint-cb821ea"
API_TOKEN_VALUE = KEY_A


@pytest.fixture(scope="module")
def base(stack) -> str:
    """`https://{api_id}.execute-api.{region}.amazonaws.com/{basePath}` for this stack."""
    return stack.api_url + "/prod"


def headers(key: str | None = API_TOKEN_VALUE, body: bool = False) -> dict:
    out = {"Accept": "application/json"}
    if body:
        out["Content-Type"] = "application/json"
    if key:
        out["x-api-key"] = key
    return out


def wait_job(base: str, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = requests.get(f"{base}/inference/get-inference-job", params={"jobID": job_id}, headers=headers(),
                           timeout=10).json()
        if job["status"] != "inprogress" or time.monotonic() > deadline:
            return job
        time.sleep(0.3)


def endpoint(base: str, name: str) -> dict | None:
    views = requests.get(f"{base}/endpoints", headers=headers(), timeout=10).json()
    return next((v for v in views if v["endpoint_name"] == name), None)


def upload_in_parts(base: str, filename: str, data: bytes, parts: int, tag_name: str) -> dict:
    """POST /checkpoint as the extension documents it, PUT each part to its presigned URL, PUT /checkpoint Active."""
    inputBody = {"checkpoint_type": "Stable-diffusion", "filenames": [{"filename": filename, "parts_number": parts}],
                 "params": {"new_model_name": "test_api", "number": 1, "string": "abc"}}
    r = requests.post(f"{base}/checkpoint", headers=headers(body=True), json=inputBody)
    assert r.status_code == 200, r.text
    created = r.json()
    assert created["statusCode"] == 200 and created["checkpoint"]["status"] == "Initial"
    assert created["checkpoint"]["params"]["new_model_name"] == "test_api"
    (upload,) = created["s3PresignUrl"]
    assert {"upload_id", "bucket", "key"} <= upload.keys() and len(upload["urls"]) == parts
    size = -(-len(data) // parts)
    tags = []
    for n, url in enumerate(upload["urls"], start=1):
        put = requests.put(url, data=data[(n - 1) * size:n * size], timeout=60)
        assert put.status_code == 200, put.text
        tags.append({"ETag": put.headers["ETag"].strip('"'), "PartNumber": n})
    inputBody = {"checkpoint_id": created["checkpoint"]["id"], "status": "Active",
                 "multi_parts_tags": {tag_name: list(reversed(tags))}}
    r = requests.put(f"{base}/checkpoint", headers=headers(body=True), json=inputBody)
    assert r.status_code == 200, r.text
    assert r.json()["checkpoint"]["status"] == "Active"
    return r.json()["checkpoint"]


def test_aws_extension_scenario_on_a_pool_of_its_own(stack, settings, storage, base, tmp_path):
    # /inference/test-connection, as written
    r = requests.get(f"{base}/inference/test-connection", headers=headers())
    assert r.json() == {"message": "Success"}

    # /endpoints(POST): the pool is recorded; capacity comes from the deployment
    inputBody = {"instance_type": "ml.g4dn.xlarge", "initial_instance_count": "1", "endpoint_name": POOL}
    r = requests.post(f"{base}/endpoints", headers=headers(body=True), json=inputBody)
    assert r.status_code == 200, r.text
    created = r.json()
    assert created["endpoint_name"] == POOL and created["endpoint_status"] == "Creating"
    assert "deployment" in created["message"] and f"--pool {POOL}" in created["message"]
    assert endpoint(base, POOL)["status"] == "inprogress"

    # /checkpoint(POST) + part upload + /checkpoint(put), with the documented file name (one part: S3's parts
    # but the last must be at least 5 MiB, and the tiny model is smaller; test_multipart_upload sends several)
    model_bytes = (settings.models_dir / "tiny-single.safetensors").read_bytes()
    checkpoint = upload_in_parts(base, "v1-5-pruned-emaonly.safetensors", model_bytes, 1,
                                 "v1-5-pruned-emaonly.safetensors.tar")
    key = checkpoint["s3_location"].split("/", 3)[3] + "/v1-5-pruned-emaonly.safetensors"
    assert storage.get(key) == model_bytes
    listed = requests.get(f"{base}/checkpoints", headers=headers()).json()
    assert listed["statusCode"] == 200
    assert any(c["id"] == checkpoint["id"] and c["status"] == "Active" and c["s3Location"].startswith("s3://")
               and isinstance(c["created"], float) for c in listed["checkpoints"])
    one = requests.get(f"{base}/checkpoint", params={"id": checkpoint["id"]}, headers=headers()).json()
    assert one["checkpoint"]["name"] == ["v1-5-pruned-emaonly.safetensors"]

    # /inference/v2, as written: queued on the pool, which has no worker yet
    body = {"task_type": "txt2img", "models": {"Stable-diffusion": ["v1-5-pruned-emaonly.safetensors"]},
            "sagemaker_endpoint_name": POOL, "prompt": "a cute panda", "denoising_strength": 0.75}
    r = requests.post(f"{base}/inference/v2", headers=headers(body=True), json=body)
    assert r.status_code == 200, r.text
    submitted = r.json()
    job_id = submitted["inference_id"]
    assert submitted == {"inference_id": job_id, "status": "inprogress", "endpoint_name": POOL,
                         "output_path": f"s3://{storage.bucket}/out/{job_id}/result"}
    pending = requests.get(f"{base}/inference/get-inference-job", params={"jobID": job_id}, headers=headers()).json()
    assert pending["status"] == "inprogress" and pending["taskType"] == "txt2img" and "completeTime" not in pending
    assert endpoint(base, POOL)["pending_jobs"] == 1

    # an uploaded LoRA, fetched by the service from a URL on an allow-listed host
    lora = (settings.lora_dir / "tiny_style.safetensors").read_bytes()
    server = FileServer({"/files/uploaded_style.safetensors": lora}, {})
    try:
        inputBody = {"checkpointType": "Lora", "modelUrl": [server.url("/files/uploaded_style.safetensors")],
                     "params": {"message": "description"}}
        r = requests.post(f"{base}/upload_checkpoint", headers=headers(body=True), json=inputBody)
        assert r.status_code == 200, r.text
        uploaded = r.json()["checkpoint"]
        assert uploaded["status"] == "Active" and uploaded["params"]["message"] == "description"
        assert "uploaded_style.safetensors" in uploaded["params"]["multipart_upload"]
    finally:
        server.close()
    assert "uploaded_style.safetensors" in requests.get(f"{base}/inference/get-lora-list", headers=headers()).json()
    lora_body = {**body, "prompt": "a cute panda <lora:uploaded_style:0.8>", "steps": 4, "width": 64, "height": 64,
                 "models": {**body["models"], "Lora": ["uploaded_style.safetensors"]}}
    lora_job = requests.post(f"{base}/inference/v2", headers=headers(body=True), json=lora_body).json()["inference_id"]

    # a worker for the pool, on a "host" with its own model and LoRA directories
    models, loras = tmp_path / "models", tmp_path / "loras"
    shutil.copytree(settings.models_dir / "sdq-tiny", models / "sdq-tiny")
    worker = stack.start_worker("poolworker", "--pool", POOL, env={
        "SDQ_MODELS_DIR": str(models), "SDQ_MODELS_LORA_DIR": str(loras), "SDQ_MODELS_DEFAULT": "sdq-tiny"})
    try:
        job = wait_job(base, job_id)
        assert job["status"] == "succeed", job
        assert job["image_names"] == ["image_0.jpg"] and job["endpoint"] == POOL
        assert job["inference_info_name"] == f"out/{job_id}/result/{job_id}_param.json"
        # Fetched from S3 into the hidden folder of the keys' own files, never into the shared listing.
        local = models / ".owned" / f"v1-5-pruned-emaonly-{checkpoint['id'][:8]}.safetensors"
        assert local.read_bytes() == model_bytes and job["checkpoint"] == local.name
        view = endpoint(base, POOL)
        assert view["endpoint_status"] == "InService" and view["status"] == "success"
        assert view["current_instance_count"] == 1 and view["endTime"]

        urls = requests.get(f"{base}/inference/get-inference-job-image-output", params={"jobID": job_id},
                            headers=headers()).json()
        assert len(urls) == 1 and f"out/{job_id}/result/image_0.jpg" in urls[0]
        image = Image.open(io.BytesIO(fetch(urls[0])))
        assert image.format == "JPEG" and image.size == (512, 512)
        (params_url,) = requests.get(f"{base}/inference/get-inference-job-param-output", params={"jobID": job_id},
                                     headers=headers()).json()
        params = json.loads(fetch(params_url))
        assert params["inference_id"] == job_id and params["endpoint_name"] == POOL
        assert params["parameters"]["prompt"] == "a cute panda" and params["parameters"]["steps"] == 28
        assert params["parameters"]["sampler_name"] == "Euler a"
        info = json.loads(params["info"])   # a JSON string, as A1111's info
        assert info["all_seeds"] == [info["seed"]] and "Euler a" in info["infotexts"][0]

        lora_result = wait_job(base, lora_job)
        assert lora_result["status"] == "succeed", lora_result
        assert (loras / ".owned" / f"uploaded_style-{uploaded['id'][:8]}.safetensors").read_bytes() == lora
        assert not list(loras.glob("*.safetensors")) and [p.name for p in models.iterdir()] == [".owned", "sdq-tiny"]
        (lora_params_url,) = requests.get(f"{base}/inference/get-inference-job-param-output",
                                          params={"jobID": lora_job}, headers=headers()).json()
        infotext = json.loads(json.loads(fetch(lora_params_url))["info"])["infotexts"][0]
        assert infotext.startswith("a cute panda\n") and f"uploaded_style-{uploaded['id'][:8]}: 0.8" in infotext

        listed = requests.get(f"{base}/inference/list-inference-jobs", headers=headers()).json()
        assert [j["InferenceJobId"] for j in listed][:2] == [lora_job, job_id]
        assert all(j["status"] in ("inprogress", "succeed", "failed") for j in listed)

        # /endpoints(DELETE), as the documented sample sends it (a POST with the list)
        inputBody = {"delete_endpoint_list": [POOL, "infer-endpoint-YYYYYY"]}
        r = requests.post(f"{base}/endpoints", headers=headers(body=True), json=inputBody)
        assert r.json() == "Endpoint deleted"
        still = endpoint(base, POOL)   # its worker still serves it until the deployment stops it
        assert still["endpoint_status"] == "InService" and still["desired_instance_count"] == 1
    finally:
        worker.stop()
    assert endpoint(base, POOL) is None


def test_multipart_upload_in_several_parts(base, storage):
    data = bytes(range(256)) * (3 * 5 * 1024 * 1024 // 256 + 1000)   # three parts of just over 5 MiB
    checkpoint = upload_in_parts(base, "big-vae.safetensors", data, 3, "big-vae.safetensors")
    key = checkpoint["s3_location"].split("/", 3)[3] + "/big-vae.safetensors"
    assert storage.get(key) == data


def test_seed_endpoint_samples_name_the_pool_after_the_job(base):
    inputBody = {"instance_type": "ml.g4dn.xlarge | ml.g4dn.2xlarge | ml.g4dn.4xlarge", "initial_instance_count": "2"}
    r = requests.post(f"{base}/endpoints", headers=headers(body=True), json=inputBody)
    created = r.json()
    assert created["endpoint_name"] == "infer-endpoint-" + created["EndpointDeploymentJobId"][:7]
    assert created["desired_instance_count"] == 2 and created["current_instance_count"] == 0
    job = requests.get(f"{base}/inference/get-endpoint-deployment-job",
                       params={"jobID": created["EndpointDeploymentJobId"]}, headers=headers()).json()
    assert job["endpoint_status"] == "Creating" and job["status"] == "inprogress"
    r = requests.delete(f"{base}/endpoints", headers=headers(body=True),
                        json={"delete_endpoint_list": [created["endpoint_name"]]})
    assert r.json() == "Endpoint deleted" and endpoint(base, created["endpoint_name"]) is None


def test_seed_samples_without_job_id_and_lists(base):
    # the documented samples for the job GETs send no jobID: a validation error naming it
    for path in ("get-inference-job", "get-inference-job-image-output", "get-inference-job-param-output"):
        r = requests.get(f"{base}/inference/{path}", headers=headers())
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["query", "jobID"]
    for path in ("get-texual-inversion-list", "get-hypernetwork-list", "get-controlnet-model-list"):
        assert requests.get(f"{base}/inference/{path}", headers=headers()).json() == []
    assert "tiny_style.safetensors" in requests.get(f"{base}/inference/get-lora-list", headers=headers()).json()
    default = endpoint(base, "gpu")
    assert default["endpoint_status"] == "InService" and default["status"] == "success"
    one = requests.get(f"{base}/inference/get-endpoint-deployment-job",
                       params={"jobID": default["EndpointDeploymentJobId"]}, headers=headers())
    assert one.json()["endpoint_name"] == "gpu"
    local = requests.get(f"{base}/checkpoints", params={"types": "Stable-diffusion", "status": "Active"},
                         headers=headers()).json()["checkpoints"]
    assert {"sdq-tiny", "tiny-single.safetensors"} <= {n for c in local for n in c["name"]}


def test_inference_on_the_default_pool_without_stage_prefix(stack):
    body = {"task_type": "txt2img", "models": {"Stable-diffusion": ["sdq-tiny"]}, "sagemaker_endpoint_name": "gpu",
            "prompt": "a cute panda", "steps": 3, "width": 64, "height": 64, "seed": 42, "batch_size": 2}
    r = requests.post(f"{stack.api_url}/inference/v2", headers=headers(body=True), json=body)
    assert r.status_code == 200, r.text
    job = wait_job(stack.api_url, r.json()["inference_id"])
    assert job["status"] == "succeed" and job["image_names"] == ["image_0.jpg", "image_1.jpg"]
    # another key does not see it
    other = requests.get(f"{stack.api_url}/inference/get-inference-job", params={"jobID": job["InferenceJobId"]},
                         headers=headers(KEY_B))
    assert other.status_code == 404 and "detail" in other.json()


def test_img2img(stack, base):
    from tests.helpers import data_url, gradient

    body = {"task_type": "img2img", "models": {"Stable-diffusion": ["sdq-tiny"]}, "sagemaker_endpoint_name": "gpu",
            "prompt": "a cute panda", "steps": 4, "width": 64, "height": 64,
            "init_images": [data_url(gradient(64, 64))], "denoising_strength": 0.5}
    r = requests.post(f"{base}/inference/v2", headers=headers(body=True), json=body)
    assert r.status_code == 200, r.text
    job = wait_job(base, r.json()["inference_id"])
    assert job["status"] == "succeed" and job["taskType"] == "img2img"
    missing = {**body, "init_images": []}
    r = requests.post(f"{base}/inference/v2", headers=headers(body=True), json=missing)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "init_images"]


def test_auth_and_validation_errors(base):
    assert requests.get(f"{base}/inference/test-connection").status_code == 403
    r = requests.get(f"{base}/inference/test-connection", headers=headers("wrong"))
    assert r.status_code == 403 and r.json() == {"message": "Forbidden"}
    assert requests.get(f"{base}/checkpoints", headers=headers("wrong")).json() == {"message": "Forbidden"}
    r = requests.get(f"{base}/endpoints", headers=headers(KEY_NATIVE_ONLY))
    assert r.status_code == 403 and "AWS" in r.json()["message"]
    bearer = requests.get(f"{base}/inference/test-connection", headers={"Authorization": f"Bearer {KEY_A}"})
    assert bearer.json() == {"message": "Success"}

    def post(body):
        return requests.post(f"{base}/inference/v2", headers=headers(body=True), json=body)

    r = post({"prompt": "x"})
    assert r.status_code == 422
    assert {tuple(e["loc"]) for e in r.json()["detail"]} == {
        ("body", "task_type"), ("body", "models"), ("body", "sagemaker_endpoint_name")}
    good = {"task_type": "txt2img", "models": {"Stable-diffusion": ["sdq-tiny"]}, "sagemaker_endpoint_name": "gpu",
            "prompt": "x"}
    r = post({**good, "models": {"Lora": ["a.safetensors"]}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "models"]
    r = post({**good, "sagemaker_endpoint_name": "infer-endpoint-nothere"})
    assert r.status_code == 400 and "infer-endpoint-nothere" in r.json()["detail"]
    r = post({**good, "models": {"Stable-diffusion": ["v9.safetensors"]}})
    assert r.status_code == 400 and "v9.safetensors" in r.json()["detail"]
    r = post({**good, "models": {"Stable-diffusion": ["sdq-tiny"], "Lora": ["nope.safetensors"]}})
    assert r.status_code == 400 and "type Lora is not found" in r.json()["detail"]
    r = post({**good, "task_type": "upscale"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "task_type"]
    r = requests.post(f"{base}/inference/v2", headers=headers(body=True), data="{not json")
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    r = requests.get(f"{base}/inference/get-inference-job", params={"jobID": "no-such-job"}, headers=headers())
    assert r.status_code == 404
    r = requests.post(f"{base}/endpoints", headers=headers(body=True), json={"initial_instance_count": "1|2|3"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "initial_instance_count"]
    r = requests.post(f"{base}/endpoints", headers=headers(body=True), json={"endpoint_name": "../etc"})
    assert r.status_code == 422
    r = requests.post(f"{base}/endpoints", headers=headers(body=True), json={"endpoint_name": "callbacks"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "endpoint_name"]
    r = post({**good, "sagemaker_endpoint_name": "callbacks"})   # the webhook queue is not a pool
    assert r.status_code == 400


def test_checkpoint_errors(base):
    r = requests.post(f"{base}/checkpoint", headers=headers(body=True),
                      json={"checkpoint_type": "Painting", "filenames": [{"filename": "../x.safetensors"}]})
    assert r.status_code == 400
    body = r.json()
    assert body["statusCode"] == 400 and "checkpoint_type" in body["error"] and "filename" in body["error"]
    r = requests.put(f"{base}/checkpoint", headers=headers(body=True),
                     json={"checkpoint_id": "906a5a1f-6833-45aa-8a10-fb0e983e0eae", "status": "Active"})
    assert r.status_code == 404 and r.json() == {
        "statusCode": 404, "error": "checkpoint not found with id 906a5a1f-6833-45aa-8a10-fb0e983e0eae"}
    created = requests.post(f"{base}/checkpoint", headers=headers(body=True), json={
        "checkpoint_type": "Stable-diffusion", "filenames": [{"filename": "never-sent.safetensors"}]}).json()
    r = requests.put(f"{base}/checkpoint", headers=headers(body=True),
                     json={"checkpoint_id": created["checkpoint"]["id"], "status": "Active"})
    assert r.status_code == 400 and "no parts of never-sent.safetensors" in r.json()["error"]
    assert requests.get(f"{base}/checkpoint", headers=headers()).status_code == 400
    assert requests.get(f"{base}/checkpoint", params={"id": "nope"}, headers=headers()).status_code == 404
    r = requests.get(f"{base}/checkpoints", params={"status": "Sleeping"}, headers=headers())
    assert r.status_code == 400 and r.json()["statusCode"] == 400


def test_an_error_under_a_digit_like_key_is_a_4xx_naming_it(base):
    """"¹" is str.isdigit() but no int: an error under such a dict key answered 500 (found by tests/test_fuzz.py);
    "٣" is a digit int() reads, but the key is the client's text, not a list index."""
    r = requests.post(f"{base}/inference/v2", headers=headers(body=True), json={
        "task_type": "txt2img", "models": {"Stable-diffusion": ["sdq-tiny"], "¹": [], "٣": []},
        "sagemaker_endpoint_name": "gpu"})
    assert r.status_code == 422, r.text
    assert sorted(tuple(e["loc"]) for e in r.json()["detail"]) == [
        ("body", "models", "¹", "key"), ("body", "models", "٣", "key")]
    r = requests.put(f"{base}/checkpoint", headers=headers(body=True), json={
        "checkpoint_id": "x", "status": "Active", "multi_parts_tags": {"²": [{"ETag": "e", "PartNumber": "x"}]}})
    assert r.status_code == 400 and "multi_parts_tags.².value.0.PartNumber" in r.json()["error"], r.text


def test_upload_checkpoint_refuses_private_addresses(base):
    server = FileServer({"/ok.safetensors": b"x" * 10, "/model.txt": b"text"},
                        {"/go": "http://127.0.0.1:1/secret.safetensors"})
    try:
        refused = ["http://127.0.0.1:6379/x.safetensors", "http://169.254.169.254/latest/meta-data",
                   "http://localhost/a.safetensors", server.url("/go"), "file:///etc/passwd"]
        for url in refused:
            r = requests.post(f"{base}/upload_checkpoint", headers=headers(body=True),
                              json={"checkpointType": "Lora", "modelUrl": [url], "params": {}})
            assert r.status_code == 400, (url, r.text)
            assert r.json()["statusCode"] == 400, url
        r = requests.post(f"{base}/upload_checkpoint", headers=headers(body=True),
                          json={"checkpointType": "Lora", "modelUrl": [server.url("/go")], "params": {}})
        assert "127.0.0.1" in r.json()["error"]
        r = requests.post(f"{base}/upload_checkpoint", headers=headers(body=True),
                          json={"checkpointType": "Lora", "modelUrl": [server.url("/model.txt")], "params": {}})
        assert r.status_code == 400 and "model.txt" in r.json()["error"]
        r = requests.post(f"{base}/upload_checkpoint", headers=headers(body=True),
                          json={"checkpointType": "Lora", "modelUrl": [server.url("/missing.safetensors")]})
        assert r.status_code == 400 and "404" in r.json()["error"]
    finally:
        server.close()


def test_rate_limit_in_gateway_shape(base):
    body = {"task_type": "txt2img", "models": {"Stable-diffusion": ["sdq-tiny"]},
            "sagemaker_endpoint_name": "infer-endpoint-nothere", "prompt": "x"}
    codes = [requests.post(f"{base}/inference/v2", headers=headers(KEY_LIMITED, body=True), json=body)
             for _ in range(4)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited and limited[0].json() == {"message": "Too Many Requests"}
    assert int(limited[0].headers["Retry-After"]) >= 1


def test_failed_job_reports_failed_and_no_outputs(base):
    body = {"task_type": "txt2img", "models": {"Stable-diffusion": ["sdq-tiny"], "Lora": ["broken.safetensors"]},
            "sagemaker_endpoint_name": "gpu", "prompt": "x <lora:broken:1>", "steps": 2, "width": 64, "height": 64}
    r = requests.post(f"{base}/inference/v2", headers=headers(body=True), json=body)
    assert r.status_code == 200, r.text
    job = wait_job(base, r.json()["inference_id"])
    assert job["status"] == "failed" and job["image_names"] == [] and "broken" in job["error"]
    for path in ("get-inference-job-image-output", "get-inference-job-param-output"):
        assert requests.get(f"{base}/inference/{path}", params={"jobID": job["InferenceJobId"]},
                            headers=headers()).json() == []


def test_worker_fetches_each_upload_once_under_its_own_name(storage, tmp_path):
    from common.store.checkpoints import Checkpoint
    from worker.assets import ensure_assets

    first = Checkpoint("11111111-aaaa", "Lora", ["style.safetensors"], "models/Lora/one")
    again = Checkpoint("22222222-bbbb", "Lora", ["style.safetensors"], "models/Lora/two")
    storage.put(first.key_of("style.safetensors"), b"first", "application/octet-stream")
    storage.put(again.key_of("style.safetensors"), b"second", "application/octet-stream")
    dirs = {"loras": tmp_path / "loras", "models": tmp_path / "models"}
    for _ in range(2):                                              # once per host
        ensure_assets(storage, [first.asset("style.safetensors"), again.asset("style.safetensors")], dirs)
    assert (dirs["loras"] / "style-11111111.safetensors").read_bytes() == b"first"
    assert (dirs["loras"] / "style-22222222.safetensors").read_bytes() == b"second"
    assert sorted(p.name for p in dirs["loras"].iterdir()) == ["style-11111111.safetensors", "style-22222222.safetensors"]


def test_a_worker_evicts_the_least_recently_used_copies_beyond_its_budget(storage, tmp_path):
    """Keys' own files pile up on worker hosts; beyond worker.owned_cache_gb the least recently used go (S3 keeps
    them), never the files the job needs nor the models loaded warm (`keep`)."""
    import os

    from common.store.checkpoints import Checkpoint
    from worker.assets import ensure_assets

    made = {n: Checkpoint(f"{n * 8}-0000", "Lora", [f"{n}.safetensors"], f"models/Lora/evict-{n}") for n in "abcd"}
    for n, checkpoint in made.items():
        storage.put(checkpoint.key_of(f"{n}.safetensors"), n.encode() * 100, "application/octet-stream")
    asset = {n: checkpoint.asset(f"{n}.safetensors") for n, checkpoint in made.items()}
    dirs = {"loras": tmp_path / "loras", "models": tmp_path / "models"}
    path = {n: dirs["loras"] / asset[n]["name"] for n in made}

    ensure_assets(storage, [asset["a"], asset["b"]], dirs, budget=250)        # 200 bytes: within the budget
    os.utime(path["a"], (2000, 2000))
    os.utime(path["b"], (1000, 1000))                                         # b is the least recently used
    ensure_assets(storage, [asset["c"]], dirs, budget=250)
    assert [n for n in "abc" if path[n].exists()] == ["a", "c"]
    os.utime(path["a"], (1000, 1000))
    os.utime(path["c"], (2000, 2000))
    ensure_assets(storage, [asset["d"]], dirs, budget=250, keep=[asset["a"]["name"]])   # a is loaded warm
    assert [n for n in "abcd" if path[n].exists()] == ["a", "d"]
    ensure_assets(storage, [asset["b"]], dirs, budget=0)                      # 0: no limit
    assert [n for n in "abcd" if path[n].exists()] == ["a", "b", "d"]


def test_keys_own_their_checkpoints_and_pools(base):
    created = requests.post(f"{base}/checkpoint", headers=headers(body=True), json={
        "checkpoint_type": "Lora", "filenames": [{"filename": "a-only.safetensors"}]}).json()["checkpoint"]
    other = {"checkpoint_id": created["id"], "status": "Disabled"}
    r = requests.put(f"{base}/checkpoint", headers=headers(KEY_B, body=True), json=other)
    assert r.status_code == 404
    r = requests.post(f"{base}/checkpoint", headers=headers(KEY_B, body=True), json={
        "checkpoint_type": "Lora", "filenames": [{"filename": "a-only.safetensors"}]})
    assert r.status_code == 200 and r.json()["checkpoint"]["id"] != created["id"]   # file names are per key
    r = requests.post(f"{base}/checkpoint", headers=headers(body=True), json={
        "checkpoint_type": "Lora", "filenames": [{"filename": "tiny_style.safetensors"}]})
    assert r.status_code == 400 and "already in the workers'" in r.json()["error"]
    r = requests.post(f"{base}/checkpoint", headers=headers(body=True), json={
        "checkpoint_type": "VAE", "filenames": [{"filename": f"f{n}.safetensors", "parts_number": 9000} for n in range(2)]})
    assert r.status_code == 400 and "parts" in r.json()["error"]

    requests.post(f"{base}/endpoints", headers=headers(body=True), json={"endpoint_name": "team-a-pool"})
    r = requests.post(f"{base}/endpoints", headers=headers(KEY_B, body=True), json={"endpoint_name": "team-a-pool"})
    taken = requests.post(f"{base}/endpoints", headers=headers(KEY_B, body=True), json={"endpoint_name": "gpu"})
    assert r.status_code == taken.status_code == 400                 # a name another key holds: as a shared pool's
    assert r.json()["detail"].replace("team-a-pool", "?") == taken.json()["detail"].replace("gpu", "?")
    requests.delete(f"{base}/endpoints", headers=headers(KEY_B, body=True), json={"delete_endpoint_list": ["team-a-pool"]})
    assert endpoint(base, "team-a-pool") is not None                 # not B's to delete
    body = {"task_type": "txt2img", "models": {"Stable-diffusion": ["sdq-tiny"]},
            "sagemaker_endpoint_name": "team-a-pool", "prompt": "x"}
    r = requests.post(f"{base}/inference/v2", headers=headers(KEY_POOLED, body=True), json=body)
    assert r.status_code == 400 and "team-a-pool not found" in r.json()["detail"]   # another key's: not there
    own = {"endpoint_name": "pooled-own"}
    assert requests.post(f"{base}/endpoints", headers=headers(KEY_POOLED, body=True), json=own).status_code == 200
    r = requests.post(f"{base}/inference/v2", headers=headers(KEY_POOLED, body=True),
                      json={**body, "sagemaker_endpoint_name": "pooled-own"})
    assert r.status_code == 403 and "pooled-own" in r.json()["detail"]   # its own, but not in api.keys[].pools
    requests.delete(f"{base}/endpoints", headers=headers(KEY_POOLED, body=True),
                    json={"delete_endpoint_list": ["pooled-own"]})
    requests.delete(f"{base}/endpoints", headers=headers(body=True), json={"delete_endpoint_list": ["team-a-pool"]})
    assert endpoint(base, "team-a-pool") is None
