"""Bounded inputs: what a client can make the API read, decode or store is capped, and a cap is a 4xx naming
the field (hardening: counts before decoding, pixels from the header)."""
from __future__ import annotations

import os

import pytest
import requests
from PIL import Image

from tests.conftest import KEY_A
from tests.helpers import data_url


def test_a1111_init_images_are_counted_before_any_is_decoded(stack, settings):
    tiny = data_url(Image.new("RGB", (8, 8)))
    body = {"prompt": "x", "steps": 1, "init_images": [tiny] * (settings.limits.max_images + 1)}
    r = requests.post(f"{stack.api_url}/sdapi/v1/img2img", json=body, auth=("anyone", KEY_A), timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "init_images", r.text
    assert "max_images" in r.text


def test_an_a1111_mask_over_the_pixel_cap_is_refused(stack):
    init = data_url(Image.new("RGB", (64, 64)))
    mask = data_url(Image.new("L", (5000, 4000)))
    body = {"prompt": "x", "steps": 1, "init_images": [init], "mask": mask}
    r = requests.post(f"{stack.api_url}/sdapi/v1/img2img", json=body, auth=("anyone", KEY_A), timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "mask", r.text


def test_pending_jobs_per_key_are_limited_by_default():
    from common.settings import load_settings

    assert load_settings(os.devnull, env={}).tasks.max_pending_per_key == 100


def test_an_idempotency_key_makes_a_retried_submission_return_its_first_task(api, api_b):
    body = {"prompt": "a retried request", "width": 64, "height": 64, "num_inference_steps": 1}
    headers = {"Idempotency-Key": "order-4711"}
    first = requests.post(api.base + "/api/v1/generate", json=body, headers={**api.headers(), **headers}, timeout=30)
    again = requests.post(api.base + "/api/v1/generate", json=body, headers={**api.headers(), **headers}, timeout=30)
    assert first.status_code == again.status_code == 202, again.text
    assert again.json()["task_id"] == first.json()["task_id"] and again.headers["Idempotent-Replayed"] == "true"
    # another key's same Idempotency-Key is its own submission (keys never see each other's tasks)
    other = requests.post(api.base + "/api/v1/generate", json=body, headers={**api_b.headers(), **headers}, timeout=30)
    assert other.status_code == 202 and other.json()["task_id"] != first.json()["task_id"]
    changed = requests.post(api.base + "/api/v1/generate", json={**body, "prompt": "something else"},
                            headers={**api.headers(), **headers}, timeout=30)
    assert changed.status_code == 422 and "Idempotency-Key" in changed.text
    refused = requests.post(api.base + "/api/v1/generate", json={**body, "width": 65},
                            headers={**api.headers(), "Idempotency-Key": "order-4712"}, timeout=30)
    assert refused.status_code == 422
    fixed = requests.post(api.base + "/api/v1/generate", json=body,
                          headers={**api.headers(), "Idempotency-Key": "order-4712"}, timeout=30)
    assert fixed.status_code == 202 and "Idempotent-Replayed" not in fixed.headers   # a refusal binds nothing
    assert api.wait(first.json()["task_id"])["status"] == "completed"


def test_the_stack_s_redis_refuses_writes_when_full_and_never_evicts(rds):
    """maxmemory + noeviction: a full Redis refuses writes (the API answers 503) and never drops tasks."""
    import redis as redis_lib

    assert rds.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    before = rds.config_get("maxmemory")["maxmemory"]
    assert int(before) > 0
    rds.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis_lib.exceptions.OutOfMemoryError):
            rds.set("sdq-test:oom-probe", "x")
    finally:
        rds.config_set("maxmemory", before)


@pytest.mark.parametrize("field, value", [
    ("script_args", ["x" * 70_000]),
    ("comments", {"note": "x" * 70_000}),
    ("alwayson_scripts", {"controlnet": {"args": ["x" * 70_000]}}),
    ("override_settings", {"junk": "x" * 70_000}),
    ("styles", [f"style {n}" for n in range(33)]),
])
def test_free_form_a1111_fields_are_bounded(stack, field, value):
    """They travel with the job (its echoed parameters, in Redis for days): at most limits.max_extra_bytes."""
    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64, field: value}
    r = requests.post(f"{stack.api_url}/sdapi/v1/txt2img", json=body, auth=("anyone", KEY_A), timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][1] == field, r.text


def test_a1111_options_are_bounded(stack):
    r = requests.post(f"{stack.api_url}/sdapi/v1/options", json={"junk": "x" * 70_000}, auth=("anyone", KEY_A),
                      timeout=30)
    assert r.status_code == 422, r.text


UNLIMITED = {   # endpoints no API key reaches, with why they carry no per-key limit
    "static": "Flask's static files (unused)",
    "api-docs.openapi_json": "the API description, the same for everyone",
    "api-docs.openapi_redoc": "the API description, the same for everyone",
    "api-docs.openapi_swagger_ui": "the API description, the same for everyone",
    "health.health": "probes of load balancers and orchestrators (no key)",
    "health.api_health": "probes of load balancers and orchestrators (no key)",
    "metrics": "Prometheus (metrics.token, not an API key)",
    "playground.index": "the playground's static page (no key; it calls the API with the user's)",
    "playground.asset": "the playground's static files (no key)",
}


def test_every_route_a_key_calls_has_a_rate_limit(monkeypatch):
    """Reads and writes count against the key's read or submit limit; a new route without one fails here."""
    from api import create_app
    from api.limits import SCOPE_ATTRIBUTE

    monkeypatch.setenv("SDQ_CONFIG", os.devnull)
    monkeypatch.setenv("SDQ_API_KEYS", "unit-key")
    app = create_app()
    unmarked = {rule.endpoint for rule in app.url_map.iter_rules()
                if getattr(app.view_functions[rule.endpoint], SCOPE_ATTRIBUTE, None) is None}
    assert unmarked == set(UNLIMITED)


def test_guessing_keys_from_one_address_is_slowed_to_a_429(stack, monkeypatch):
    """api.auth_failures_per_minute wrong keys per client address, counted in the stack's Redis; then 429
    for the rest of the minute. Valid keys from that address, and other addresses, go on."""
    import uuid

    from api import create_app

    monkeypatch.setenv("SDQ_CONFIG", os.devnull)
    monkeypatch.setenv("SDQ_REDIS_URL", stack.redis_url)
    monkeypatch.setenv("SDQ_API_KEYS", KEY_A)
    monkeypatch.setenv("SDQ_API_AUTH_FAILURES_PER_MINUTE", "3")
    client = create_app().test_client()
    guesser = {"REMOTE_ADDR": f"10.{uuid.uuid4().int % 250}.7.{uuid.uuid4().int % 250}"}
    answers = [client.get("/api/v1/models", headers={"X-API-Key": f"guess-{n}"}, environ_base=guesser).status_code
               for n in range(5)]
    assert answers == [401, 401, 401, 429, 429]
    refused = client.get("/api/v1/models", headers={"X-API-Key": "guess-9"}, environ_base=guesser)
    assert refused.headers["Retry-After"] == "60" and "detail" in refused.get_json()
    assert client.get("/api/v1/models", headers={"X-API-Key": KEY_A}, environ_base=guesser).status_code == 200
    other = {"REMOTE_ADDR": "10.250.250.250"}
    assert client.get("/api/v1/models", headers={"X-API-Key": "guess"}, environ_base=other).status_code == 401
    a1111 = client.get("/sdapi/v1/sd-models", headers={"X-API-Key": "guess-a"}, environ_base=guesser)
    assert a1111.status_code == 429                                    # one count for every dialect


def test_free_form_fields_of_the_aws_extension_and_sd_on_eks_are_bounded(stack):
    """The AWS extension's checkpoint `params` are stored with the checkpoint, SD on EKS's `uid` with the job."""
    headers = {"x-api-key": KEY_A, "Content-Type": "application/json"}
    checkpoint = {"checkpoint_type": "Stable-diffusion", "filenames": [{"filename": "a.safetensors"}],
                  "params": {"note": "x" * 70_000}}
    r = requests.post(f"{stack.api_url}/prod/checkpoint", json=checkpoint, headers=headers, timeout=30)
    assert r.status_code == 400 and "params" in r.text, r.text
    eks = {"prompt": "x", "steps": 1, "width": 64, "height": 64,
           "alwayson_scripts": {"task": "text-to-image", "sd_model_checkpoint": "sdq-tiny", "id_task": "uid-cap",
                                "uid": "u" * 300}}
    r = requests.post(f"{stack.api_url}/", json=eks, headers=headers, timeout=30)
    assert r.status_code == 400 and "uid" in r.json()["message"], r.text
