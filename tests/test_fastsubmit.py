"""api/fastsubmit.py: well-formed submissions skip Flask, and answer exactly as the Flask route does.

In-process apps on the real Redis/S3 of the session stack, with a queue no
worker consumes, so the tasks written can be compared field by field.
"""
from __future__ import annotations

import pytest

from tests.conftest import KEY_A, KEY_LIMITED, KEY_NATIVE_ONLY
from tests.helpers import data_url, gradient

QUEUE = "nobody-consumes-fastsubmit"
BODY = {"prompt": "a lighthouse at dusk", "negative_prompt": "fog", "width": 64, "height": 64, "seed": 42,
        "num_images": 2, "scheduler": "DDIMScheduler", "guidance_scale": 6.5, "output_format": "jpg",
        "loras": [{"name": "tiny_style", "weight": 0.5}]}


def build_app(stack, fast: bool):
    from api import create_app
    from common.settings import load_settings

    return create_app(load_settings(env={**stack.env(), "SDQ_TASKS_QUEUE": QUEUE,
                                         "SDQ_API_FAST_SUBMIT": "1" if fast else "0"}))


class CountingApp:
    """Stands between FastSubmit and Flask: how many requests reached Flask."""

    def __init__(self, app):
        self.app, self.calls = app, 0

    def __call__(self, environ, start_response):
        self.calls += 1
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def fast_app(stack):
    from api.fastsubmit import FastSubmit

    app = build_app(stack, fast=True)
    fast = app.wsgi_app
    while not isinstance(fast, FastSubmit):   # under the StagePrefix middleware
        fast = fast.app
    fast.app = CountingApp(fast.app)
    app.flask_calls = fast.app
    return app


def cancel(app, response) -> None:
    if response.status_code == 202:
        app.test_client().delete(f"/api/v1/tasks/{response.get_json()['task_id']}", headers={"X-API-Key": KEY_A})


def stored_spec(app, task_id: str) -> dict:
    return app.extensions["sdq"].store.get(task_id).spec.to_dict()


def test_fast_answer_and_task_equal_the_flask_routes(stack, fast_app):
    slow_app = build_app(stack, fast=False)
    before = fast_app.flask_calls.calls
    fast = fast_app.test_client().post("/api/v1/generate", json=BODY, headers={"X-API-Key": KEY_A})
    slow = slow_app.test_client().post("/api/v1/generate", json=BODY, headers={"X-API-Key": KEY_A})
    try:
        assert fast_app.flask_calls.calls == before, "a well-formed submission reached Flask"
        assert (fast.status_code, slow.status_code) == (202, 202)
        assert fast.headers["Content-Type"] == slow.headers["Content-Type"] == "application/json"
        fast_body, slow_body = fast.get_json(), slow.get_json()
        assert fast_body.keys() == slow_body.keys() and fast_body["message"] == slow_body["message"]
        assert fast.data.replace(fast_body["task_id"].encode(), b"") == slow.data.replace(slow_body["task_id"].encode(), b"")
        assert stored_spec(fast_app, fast_body["task_id"]) == stored_spec(slow_app, slow_body["task_id"])
        task = fast_app.extensions["sdq"].store.get(fast_body["task_id"])
        assert task.queue == QUEUE and task.status.value == "pending"
    finally:
        cancel(fast_app, fast)
        cancel(slow_app, slow)


@pytest.mark.parametrize("name, kwargs, status", [
    ("malformed JSON", {"data": b"{not json", "content_type": "application/json"}, 400),
    ("no key", {"json": BODY, "headers": {}}, 401),
    ("wrong key", {"json": BODY, "headers": {"X-API-Key": "nope"}}, 401),
    ("field error", {"json": {**BODY, "width": 65}}, 422),
    ("not an object", {"json": ["prompt"]}, 422),
    ("model not allowed", {"json": {**BODY, "model": "tiny-single.safetensors"},
                           "headers": {"X-API-Key": KEY_NATIVE_ONLY}}, 403),
    ("form body", {"data": {"prompt": "x"}}, 422),
    ("img2img", {"json": {"prompt": "x", "init_image": data_url(gradient(64, 64))}}, 202),
    ("rate-limited key", {"json": BODY, "headers": {"X-API-Key": KEY_LIMITED}}, 202),
])
def test_everything_else_is_answered_by_flask(fast_app, name, kwargs, status):
    kwargs.setdefault("headers", {"X-API-Key": KEY_A})
    before = fast_app.flask_calls.calls
    response = fast_app.test_client().post("/api/v1/generate", **kwargs)
    try:
        assert response.status_code == status, (name, response.get_data(as_text=True))
        assert fast_app.flask_calls.calls == before + 1, name
        if status >= 400:
            assert "detail" in response.get_json()
    finally:
        cancel(fast_app, response)


def test_stage_prefixed_submission_takes_the_fast_path(fast_app):
    before = fast_app.flask_calls.calls
    response = fast_app.test_client().post("/prod/api/v1/generate", json=BODY, headers={"X-API-Key": KEY_A})
    try:
        assert response.status_code == 202 and fast_app.flask_calls.calls == before
    finally:
        cancel(fast_app, response)
