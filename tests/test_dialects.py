"""SD on EKS, /v1/draw, per-key limits and policies, against the real stack."""
from __future__ import annotations

import io
import json
import time

import pytest
import requests
from PIL import Image

from api.auth import ApiKey
from tests.conftest import FUZZ_QUEUE, KEY_A, KEY_B, KEY_FUZZ, KEY_LIMITED, KEY_NATIVE_ONLY
from tests.helpers import FileServer, fetch

EKS_BODY = {
    "alwayson_scripts": {
        "task": "text-to-image",
        "sd_model_checkpoint": "sdq-tiny",
        "id_task": "123",
        "uid": "123",
        "save_dir": "outputs",
    },
    "prompt": "A dog",
    "steps": 16,
    "width": 64,
    "height": 64,
}
OWNER_A = ApiKey(KEY_A, "a").owner   # SD on EKS writes under {save_dir}/{owner}/{id_task}


def list_keys(storage, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=prefix).get("Contents", []))


def wait_for_objects(storage, prefix: str, count: int, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        keys = list_keys(storage, prefix)
        if len(keys) >= count:
            return keys
        time.sleep(0.2)
    return list_keys(storage, prefix)


@pytest.mark.parametrize("path", ["/", "/prod/"])
def test_eks_example_answers_at_once_and_images_appear(stack, storage, path):
    body = {**EKS_BODY, "alwayson_scripts": {**EKS_BODY["alwayson_scripts"], "id_task": f"dog-{path.strip('/') or 'root'}"}}
    r = requests.post(stack.api_url + path, json=body, headers={"x-api-key": KEY_A}, timeout=10)
    assert r.status_code == 200, r.text
    id_task = body["alwayson_scripts"]["id_task"]
    assert r.json() == {"id_task": id_task, "task": "text-to-image", "sd_model_checkpoint": "sdq-tiny",
                        "output_location": f"s3://{storage.bucket}/outputs/{OWNER_A}/{id_task}"}
    keys = wait_for_objects(storage, f"outputs/{OWNER_A}/{id_task}/", 2)
    assert keys[0] == f"outputs/{OWNER_A}/{id_task}/0.png" and len(keys) == 2
    assert keys[1].startswith(f"outputs/{OWNER_A}/{id_task}/response-") and keys[1].endswith(".out")
    out = json.loads(storage.get(keys[1]))   # the original's result file, beside the images
    assert out["images"] == [""] and out["info"] == ""
    params = out["parameters"]
    assert params["id_task"] == id_task and params["status"] == 1 and params["error_msg"] == ""
    assert params["image_url"] == f"s3://{storage.bucket}/{keys[0]}" and params["image_seed"].isdigit()
    assert params["prompt"] == "A dog" and params["steps"] == 16


def test_eks_id_task_is_an_idempotency_key(stack, storage, rds):
    body = {**EKS_BODY, "alwayson_scripts": {**EKS_BODY["alwayson_scripts"], "id_task": "once-only"}}
    before = len(rds.keys("sdq:task:eks-*"))
    for _ in range(3):
        assert requests.post(stack.api_url + "/", json=body, headers={"x-api-key": KEY_A}, timeout=10).status_code == 200
    assert len(rds.keys("sdq:task:eks-*")) == before + 1
    # another key's id_task of the same name is its own job
    assert requests.post(stack.api_url + "/", json=body, headers={"x-api-key": KEY_B}, timeout=10).status_code == 200
    assert len(rds.keys("sdq:task:eks-*")) == before + 2


def test_eks_image_to_image_and_errors(stack, storage):
    from tests.helpers import data_url, gradient

    body = {**EKS_BODY, "init_images": [data_url(gradient(64, 64))],
            "alwayson_scripts": {**EKS_BODY["alwayson_scripts"], "task": "image-to-image", "id_task": "i2i-1"}}
    assert requests.post(stack.api_url + "/", json=body, headers={"x-api-key": KEY_A}, timeout=10).status_code == 200
    assert wait_for_objects(storage, f"outputs/{OWNER_A}/i2i-1/", 2)[0] == f"outputs/{OWNER_A}/i2i-1/0.png"
    no_key = requests.post(stack.api_url + "/", json=EKS_BODY, timeout=10)
    assert no_key.status_code == 401 and "message" in no_key.json()
    missing = requests.post(stack.api_url + "/", json={"prompt": "x"}, headers={"x-api-key": KEY_A}, timeout=10)
    assert missing.status_code == 400 and "alwayson_scripts" in missing.json()["message"]
    bad_model = {**EKS_BODY, "alwayson_scripts": {**EKS_BODY["alwayson_scripts"], "sd_model_checkpoint": "nope"}}
    r = requests.post(stack.api_url + "/", json=bad_model, headers={"x-api-key": KEY_A}, timeout=10)
    assert r.status_code == 400 and "nope" in r.json()["message"]
    escape = {**EKS_BODY, "alwayson_scripts": {**EKS_BODY["alwayson_scripts"], "save_dir": "../etc"}}
    r = requests.post(stack.api_url + "/", json=escape, headers={"x-api-key": KEY_A}, timeout=10)
    assert r.status_code == 400 and "save_dir" in r.json()["message"]
    assert requests.post(stack.api_url + "/", data="{bad", headers={"x-api-key": KEY_A,
                         "Content-Type": "application/json"}, timeout=10).status_code == 400


def test_eks_image_link_fetches_http_and_s3_images(stack, storage):
    from tests.helpers import gradient

    png = io.BytesIO()
    gradient(64, 64).save(png, format="PNG")
    storage.put("inputs/cat.png", png.getvalue(), "image/png")
    server = FileServer({"/cat.png": png.getvalue(), "/notes.txt": b"not an image"}, {})
    try:
        for n, link in enumerate([server.url("/cat.png"), f"s3://{storage.bucket}/inputs/cat.png"]):
            scripts = {**EKS_BODY["alwayson_scripts"], "task": "image-to-image", "id_task": f"link-{n}",
                       "image_link": link}
            r = requests.post(stack.api_url + "/", json={**EKS_BODY, "alwayson_scripts": scripts},
                              headers={"x-api-key": KEY_A}, timeout=10)
            assert r.status_code == 200, r.text
            folder = f"outputs/{OWNER_A}/link-{n}"
            assert wait_for_objects(storage, f"{folder}/", 2)[0] == f"{folder}/0.png"
        a_output = f"s3://{storage.bucket}/" + wait_for_objects(storage, f"outputs/{OWNER_A}/dog-root/", 1)[0]   # A's
        scripts = {**EKS_BODY["alwayson_scripts"], "task": "image-to-image", "id_task": "b-reads-a", "image_link": a_output}
        r = requests.post(stack.api_url + "/", json={**EKS_BODY, "alwayson_scripts": scripts},
                          headers={"x-api-key": KEY_B}, timeout=10)
        assert r.status_code == 400 and "no such object" in r.json()["message"]   # another key's image
        refused = {"http://127.0.0.1:6379/x.png": "non-public", server.url("/notes.txt"): "not a readable",
                   "s3://another-bucket/x.png": "only s3://", server.url("/gone.png"): "404", "ftp://x/y.png": "http"}
        for link, reason in refused.items():
            scripts = {**EKS_BODY["alwayson_scripts"], "task": "image-to-image", "id_task": "refused",
                       "image_link": link}
            r = requests.post(stack.api_url + "/", json={**EKS_BODY, "alwayson_scripts": scripts},
                              headers={"x-api-key": KEY_A}, timeout=10)
            assert r.status_code == 400 and reason in r.json()["message"], (link, r.text)
        scripts = {**EKS_BODY["alwayson_scripts"], "task": "image-to-image", "id_task": "no-image"}
        r = requests.post(stack.api_url + "/", json={**EKS_BODY, "alwayson_scripts": scripts},
                          headers={"x-api-key": KEY_A}, timeout=10)
        assert r.status_code == 400 and "image_link" in r.json()["message"]
    finally:
        server.close()


def draw(stack, body, key=KEY_A):
    return requests.post(f"{stack.api_url}/v1/draw", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def test_draw_seed_example(stack):
    r = draw(stack, {"prompt": "cat"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "draw" and body["prompt"] == "cat" and body["model"] == "sdq-tiny"
    assert len(body["urls"]) == 1 and body["end_at"] >= body["created"]
    image = Image.open(__import__("io").BytesIO(fetch(body["urls"][0])))
    assert image.size == (128, 128)


def test_draw_size_and_quantity(stack):
    r = draw(stack, {"prompt": "cat", "size": "16:9", "quantity": 2})
    assert r.status_code == 200, r.text
    urls = r.json()["urls"]
    assert len(urls) == 2
    width, height = Image.open(__import__("io").BytesIO(fetch(urls[0]))).size
    assert width % 8 == 0 and height % 8 == 0 and width > height


def test_draw_errors_use_the_draw_api_codes(stack):
    assert draw(stack, {"prompt": "cat"}, key="wrong").status_code == 401
    no_auth = requests.post(f"{stack.api_url}/v1/draw", json={"prompt": "cat"}, timeout=10)
    assert no_auth.status_code == 401 and no_auth.json()["error"]["type"] == "authentication_error"
    bad = draw(stack, {"prompt": "cat", "size": "2:1"})
    assert bad.status_code == 400 and "size" in bad.json()["error"]["message"]
    assert draw(stack, {}).status_code == 400
    forbidden = draw(stack, {"prompt": "cat"}, key=KEY_NATIVE_ONLY)
    assert forbidden.status_code == 403 and forbidden.json()["error"]["type"] == "permission_error"
    assert requests.post(f"{stack.api_url}/v1/nothing", headers={"Authorization": f"Bearer {KEY_A}"},
                         timeout=10).status_code == 404


def test_submissions_are_throttled_per_key_across_dialects(stack):
    """KEY_LIMITED may submit 2/s, counted across every dialect; 429 carries Retry-After."""
    native = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1}
    headers = {"X-API-Key": KEY_LIMITED}
    codes = [requests.post(f"{stack.api_url}/api/v1/generate", json=native, headers=headers, timeout=10).status_code
             for _ in range(2)]
    eks = {**EKS_BODY, "alwayson_scripts": {**EKS_BODY["alwayson_scripts"], "id_task": "limited-1"}}
    third = requests.post(stack.api_url + "/", json=eks, headers={"x-api-key": KEY_LIMITED}, timeout=10)
    assert codes == [202, 202]
    assert third.status_code == 429 and third.json() == {"message": "Too Many Requests"}
    assert int(third.headers["Retry-After"]) >= 1
    native_429 = requests.post(f"{stack.api_url}/api/v1/generate", json=native, headers=headers, timeout=10)
    assert native_429.status_code == 429 and "detail" in native_429.json()
    # other keys are not affected, and reads have their own budget
    assert requests.post(f"{stack.api_url}/api/v1/generate", json=native, headers={"X-API-Key": KEY_B},
                         timeout=10).status_code == 202
    assert requests.get(f"{stack.api_url}/api/v1/tasks", headers=headers, timeout=10).status_code == 200
    time.sleep(1.1)
    assert requests.post(f"{stack.api_url}/api/v1/generate", json=native, headers=headers,
                         timeout=10).status_code == 202


def test_reads_have_their_own_higher_limit(stack):
    headers = {"X-API-Key": KEY_LIMITED}
    time.sleep(1.1)
    codes = [requests.get(f"{stack.api_url}/api/v1/tasks", headers=headers, timeout=10).status_code for _ in range(6)]
    assert codes[:4] == [200] * 4 and 429 in codes[4:]


def test_key_policies_limit_dialects_and_models(stack):
    headers = {"X-API-Key": KEY_NATIVE_ONLY}
    assert requests.post(f"{stack.api_url}/api/v1/generate", json={"prompt": "x", "model": "tiny-single.safetensors"},
                         headers=headers, timeout=10).status_code == 403
    assert requests.post(f"{stack.api_url}/api/v1/generate", json={"prompt": "x", "width": 64, "height": 64,
                         "num_inference_steps": 1}, headers=headers, timeout=10).status_code == 202
    assert requests.get(f"{stack.api_url}/sdapi/v1/options", headers=headers, timeout=10).status_code == 403
    assert requests.post(stack.api_url + "/", json=EKS_BODY, headers=headers, timeout=10).status_code == 403


def test_a_key_with_its_own_queue_sends_every_job_there(stack, rds):
    """api.keys[].queue: the key's jobs wait in its pool's queue in every dialect that names no pool (here
    none serves it), never in the default one."""
    from common.store import keys

    headers = {"X-API-Key": KEY_FUZZ}
    native = requests.post(f"{stack.api_url}/api/v1/generate", json={"prompt": "x"}, headers=headers, timeout=10)
    eks = requests.post(stack.api_url + "/", json={**EKS_BODY, "alwayson_scripts": {
        **EKS_BODY["alwayson_scripts"], "id_task": "own-queue"}}, headers=headers, timeout=10)
    assert native.status_code == 202 and eks.status_code == 200, eks.text
    waiting = rds.zrange(keys.PENDING(FUZZ_QUEUE), 0, -1)
    try:
        assert native.json()["task_id"] in waiting and len(waiting) == 2
        assert not set(waiting) & set(rds.zrange(keys.PENDING("gpu"), 0, -1))
        assert requests.get(f"{stack.api_url}/api/v1/tasks/{native.json()['task_id']}", headers=headers,
                            timeout=10).json()["queue_position"] == 1
    finally:
        for task_id in waiting:
            requests.delete(f"{stack.api_url}/api/v1/tasks/{task_id}", headers=headers, timeout=10)


def test_full_queue_is_refused_at_once_in_every_dialect(stack):
    """tasks.max_pending reached: native 503 + Retry-After, /v1/draw 529, the others 503 in their shapes."""
    from api import create_app
    from common.settings import load_settings

    env = {**stack.env(), "SDQ_TASKS_MAX_PENDING": "1", "SDQ_TASKS_QUEUE": "nobody-consumes-this"}
    client = create_app(load_settings(env=env)).test_client()
    native = {"prompt": "x", "width": 64, "height": 64}
    first = client.post("/api/v1/generate", json=native, headers={"X-API-Key": KEY_A})
    assert first.status_code == 202
    try:
        full = client.post("/api/v1/generate", json=native, headers={"X-API-Key": KEY_A})
        assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
        assert "queue is full" in full.get_json()["detail"]
        drawn = client.post("/v1/draw", json={"prompt": "cat"}, headers={"Authorization": f"Bearer {KEY_A}"})
        assert drawn.status_code == 529 and drawn.get_json()["error"]["type"] == "overloaded_error"
        eks = {**EKS_BODY, "alwayson_scripts": {**EKS_BODY["alwayson_scripts"], "id_task": "full-queue"}}
        r = client.post("/", json=eks, headers={"x-api-key": KEY_A})
        assert r.status_code == 503 and "queue is full" in r.get_json()["message"]
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x"}, headers={"X-API-Key": KEY_A})
        assert r.status_code == 503 and "queue is full" in r.get_json()["detail"]
        aws = {"task_type": "txt2img", "models": {"Stable-diffusion": ["sdq-tiny"]},
               "sagemaker_endpoint_name": "nobody-consumes-this", "prompt": "x"}
        r = client.post("/inference/v2", json=aws, headers={"x-api-key": KEY_A})
        assert r.status_code == 503 and "queue is full" in r.get_json()["detail"]
    finally:
        client.delete(f"/api/v1/tasks/{first.get_json()['task_id']}", headers={"X-API-Key": KEY_A})


def test_draw_refuses_oversized_bodies(stack):
    from api import create_app
    from common.settings import load_settings

    client = create_app(load_settings(env={**stack.env(), "SDQ_API_MAX_BODY_BYTES": "1000"})).test_client()
    r = client.post("/v1/draw", json={"prompt": "x" * 2000}, headers={"Authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 413 and r.get_json()["type"] == "error"


def test_draw_answers_409_when_its_key_cancels_its_job(stack, rds):
    """A /v1/draw call whose job its own key cancelled (native DELETE, while queued) is the client's doing: 409, not
    the 500 of a job that failed (issue 13: no 5xx for anything a client can do)."""
    import threading

    from api import create_app
    from common.settings import load_settings
    from common.store import keys

    queue = "nobody-consumes-draws"
    app = create_app(load_settings(env={**stack.env(), "SDQ_TASKS_QUEUE": queue}))
    answer = {}
    caller = threading.Thread(target=lambda: answer.update(r=app.test_client().post(
        "/v1/draw", json={"prompt": "cat"}, headers={"Authorization": f"Bearer {KEY_A}"})))
    caller.start()
    deadline = time.monotonic() + 30
    while not rds.zcard(keys.PENDING(queue)) and time.monotonic() < deadline:
        time.sleep(0.05)
    (task_id,) = rds.zrange(keys.PENDING(queue), 0, -1)
    assert app.test_client().delete(f"/api/v1/tasks/{task_id}", headers={"X-API-Key": KEY_A}).status_code == 200
    caller.join(30)
    r = answer["r"]
    assert r.status_code == 409 and r.get_json()["error"]["type"] == "invalid_request_error"
    assert "cancel" in r.get_json()["error"]["message"]
