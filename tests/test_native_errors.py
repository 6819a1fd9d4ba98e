"""Every documented error of the native API: right code, {"detail": ...}, field named."""
from __future__ import annotations

import base64

import pytest
import requests

from tests.helpers import data_url, gradient

GOOD = {"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 4}


def detail_locs(response) -> list[list]:
    return [entry["loc"] for entry in response.json()["detail"]]


def test_missing_key_is_401(api):
    response = requests.post(api.base + "/api/v1/generate", json=GOOD, timeout=10)
    assert response.status_code == 401
    assert "X-API-Key" in response.json()["detail"]


def test_wrong_key_is_401(api):
    assert api.post("/api/v1/generate", GOOD, key="not-a-key").status_code == 401
    assert api.get("/api/v1/tasks", key="").status_code == 401


def test_every_authenticated_endpoint_needs_a_key(api):
    for path in ("/api/v1/tasks", "/api/v1/models", "/api/v1/schedulers", "/api/v1/loras",
                 "/api/v1/tasks/00000000-0000-0000-0000-000000000000"):
        assert requests.get(api.base + path, timeout=10).status_code == 401, path


def test_health_needs_no_key(api):
    for path in ("/health", "/api/health"):
        response = requests.get(api.base + path, timeout=10)
        assert response.status_code == 200
        assert response.json()["status"] == "ok"


def test_malformed_json_is_400(api):
    response = requests.post(api.base + "/api/v1/generate", data="{not json",
                             headers={**api.headers(), "Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 400
    assert isinstance(response.json()["detail"], str)


def test_missing_prompt_is_422_in_seed_shape(api):
    response = api.post("/api/v1/generate", {"width": 64})
    assert response.status_code == 422
    assert response.json() == {"detail": [
        {"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]}


def test_non_object_body_is_422(api):
    response = api.post("/api/v1/generate", ["a", "list"])
    assert response.status_code == 422
    assert detail_locs(response) == [["body"]]


@pytest.mark.parametrize("field,value", [
    ("width", 65), ("height", 100), ("width", 8), ("width", 4096), ("width", "wide"), ("width", 64.5),
    ("num_images", 0), ("num_images", 11), ("num_inference_steps", 0), ("num_inference_steps", 1000),
    ("guidance_scale", -1), ("guidance_scale", "high"), ("guidance_scale", True), ("strength", 1.5),
    ("strength", -0.1), ("scheduler", "NotAScheduler"), ("seed", -2), ("seed", 2**40), ("seed", "abc"),
    ("output_format", "gif"), ("callback_url", "not a url"), ("callback_url", "ftp://example.com/x"),
    ("model", "no-such-model"), ("prompt", None), ("prompt", 123), ("negative_prompt", 5),
    ("loras", "tiny_style"), ("init_image", 42),
])
def test_bad_field_is_422_naming_it(api, field, value):
    response = api.post("/api/v1/generate", {**GOOD, field: value})
    assert response.status_code == 422, response.text
    assert ["body", field] in detail_locs(response)


def test_prompt_too_long_is_422(api, settings):
    response = api.post("/api/v1/generate", {**GOOD, "prompt": "x" * (settings.limits.max_prompt_chars + 1)})
    assert response.status_code == 422
    assert ["body", "prompt"] in detail_locs(response)


def test_unknown_lora_names_its_index(api):
    response = api.post("/api/v1/generate", {**GOOD, "loras": [{"name": "tiny_style"}, {"name": "nope"}]})
    assert response.status_code == 422
    assert ["body", "loras", 1, "name"] in detail_locs(response)


@pytest.mark.parametrize("loras", [[-12036], ["tiny_style"], [None], [{"weight": 1}], [[1, 2]]])
def test_malformed_lora_items_are_422_not_500(api, loras):
    """Found by fuzzing: the name check ran on items that had failed validation (KeyError, 500)."""
    response = api.post("/api/v1/generate", {**GOOD, "loras": loras})
    assert response.status_code == 422, response.text
    assert any(loc[:3] == ["body", "loras", 0] for loc in detail_locs(response)), response.text


def test_an_image_over_the_pixel_cap_is_refused_before_decoding(api, settings):
    """limits.max_image_pixels is checked from the header: a 5000x4000 PNG (20 Mpx) is a 422."""
    from PIL import Image

    from tests.helpers import data_url

    big = Image.new("L", (5000, 4000))
    response = api.post("/api/v1/generate", {**GOOD, "init_image": data_url(big)})
    assert response.status_code == 422 and ["body", "init_image"] in detail_locs(response)
    assert "max_image_pixels" in response.text


def test_lora_weight_out_of_range(api):
    response = api.post("/api/v1/generate", {**GOOD, "loras": [{"name": "tiny_style", "weight": 99}]})
    assert response.status_code == 422
    assert ["body", "loras", 0, "weight"] in detail_locs(response)


@pytest.mark.parametrize("value", [
    "data:image/png;base64,!!!notbase64!!!",
    "data:image/png;base64," + base64.b64encode(b"plain text, not an image").decode(),
    "data:text/plain;base64," + base64.b64encode(b"hello").decode(),
    "data:image/png,rawbytes",
    "",
])
def test_bad_init_image_is_422(api, value):
    response = api.post("/api/v1/generate", {**GOOD, "init_image": value})
    assert response.status_code == 422, response.text
    assert ["body", "init_image"] in detail_locs(response)


def test_init_image_too_small_or_gif_is_422(api):
    tiny = api.post("/api/v1/generate", {**GOOD, "init_image": data_url(gradient(16, 16))})
    assert tiny.status_code == 422 and ["body", "init_image"] in detail_locs(tiny)
    gif = api.post("/api/v1/generate", {**GOOD, "init_image": data_url(gradient(64, 64), "GIF")})
    assert gif.status_code == 422 and ["body", "init_image"] in detail_locs(gif)


def test_all_errors_reported_together(api):
    response = api.post("/api/v1/generate", {"width": 63, "num_images": 99})
    locs = detail_locs(response)
    assert {("body", "prompt"), ("body", "width"), ("body", "num_images")} <= {tuple(x) for x in locs}


def test_unknown_fields_are_ignored(api):
    response = api.post("/api/v1/generate", {**GOOD, "some_future_field": 1})
    assert response.status_code == 202


def test_unknown_task_is_404_seed_message(api):
    response = api.get("/api/v1/tasks/00000000-0000-0000-0000-000000000000")
    assert response.status_code == 404
    assert response.json() == {"detail": "任务不存在"}


def test_bad_query_params_are_422(api):
    assert api.get("/api/v1/tasks?limit=0").status_code == 422
    assert api.get("/api/v1/tasks?status=weird").status_code == 422
    response = api.get("/api/v1/tasks/x?wait=9999")
    assert response.status_code == 422 and ["query", "wait"] in detail_locs(response)


def test_unknown_route_and_method_are_json(api):
    response = api.get("/api/v1/nothing-here")
    assert response.status_code == 404 and "detail" in response.json()
    response = requests.put(api.base + "/api/v1/generate", json=GOOD, headers=api.headers(), timeout=10)
    assert response.status_code == 405 and "detail" in response.json()


def test_oversized_body_is_413_json(api, settings):
    body = b'{"prompt": "' + b"x" * (settings.api.max_body_bytes + 10) + b'"}'
    response = requests.post(api.base + "/api/v1/generate", data=body,
                             headers={**api.headers(), "Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert "detail" in response.json()


@pytest.mark.parametrize("body,loc", [
    ('{"prompt": "\\ud800"}', ["body", "prompt"]),
    ('{"prompt": "x", "model": "\\udfff"}', ["body", "model"]),
    ('{"prompt": "x", "loras": [{"name": "\\ud800"}]}', ["body", "loras", 0, "name"]),
])
def test_lone_surrogates_are_422_not_500(api, body, loc):
    response = requests.post(api.base + "/api/v1/generate", data=body,
                             headers={**api.headers(), "Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 422, response.text
    assert loc in detail_locs(response)


def test_absurdly_nested_json_is_400(api):
    response = requests.post(api.base + "/api/v1/generate", data="[" * 100_000,
                             headers={**api.headers(), "Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "detail" in response.json()


def test_truncated_jpeg_is_422(api):
    import io

    buf = io.BytesIO()
    gradient(64, 64).save(buf, format="JPEG")
    truncated = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()[:300]).decode()
    response = api.post("/api/v1/generate", {**GOOD, "init_image": truncated})
    assert response.status_code == 422 and ["body", "init_image"] in detail_locs(response)
