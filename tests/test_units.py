"""Pure functions: settings, infotext, webhook payloads, device pinning, docs, imports."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from common.infotext import build_infotext, parse_infotext
from common.jobspec import JobSpec, LoraRef
from common.settings import SettingsError, example_yaml, load_settings
from worker.device import pin_device
from worker.webhook import build_payload, sign

ROOT = Path(__file__).resolve().parent.parent


def test_settings_layers(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("api:\n  keys: ['a', 'b']\n  key_header: X-Key\ntasks:\n  time_limit: 30\n")
    s = load_settings(config, env={"SDQ_TASKS_TIME_LIMIT": "45", "SDQ_DEFAULTS_SCHEDULER": "DDIMScheduler",
                                          "SDQ_MODELS_OVERRIDES": '{"m.safetensors": {"steps": 4}}'})
    assert s.api.keys == ["a", "b"] and s.api.key_header == "X-Key"
    assert s.tasks.time_limit == 45 and s.defaults.scheduler == "DDIMScheduler"
    assert s.models.overrides == {"m.safetensors": {"steps": 4}}   # a dict option stays a dict (dots in keys)
    assert load_settings(config, env={"SDQ_API_KEYS": "x, y ,z"}).api.keys == ["x", "y", "z"]
    assert load_settings(config, env={}, overrides={"api.port": 9000}).api.port == 9000
    with pytest.raises(SettingsError):
        load_settings(config, env={"SDQ_API_PORT": "eighty"})


def test_config_example_is_generated_from_the_option_table():
    assert (ROOT / "config.example.yaml").read_text() == example_yaml()
    assert load_settings(ROOT / "config.example.yaml", env={}).tasks.time_limit == 600


def test_infotext_round_trip():
    spec = JobSpec(prompt="a cat, on a mat", negative_prompt="ugly", model="m", width=64, height=72,
                   num_inference_steps=20, guidance_scale=7.5, seed=5, loras=[LoraRef("style", 0.5)])
    text = build_infotext(spec, 6, 64, 72, "Euler a")
    parsed = parse_infotext(text)
    assert parsed["prompt"] == "a cat, on a mat" and parsed["negative_prompt"] == "ugly"
    assert parsed["Seed"] == "6" and parsed["Size"] == "64x72" and parsed["Sampler"] == "Euler a"
    assert parsed["Lora weights"] == "style: 0.5"


def test_webhook_payload_shapes_and_signature():
    assert build_payload("t", "completed", ["u"], None) == {"task_id": "t", "status": "completed",
                                                            "image_url": "u", "error_message": None}
    many = build_payload("t", "completed", ["u1", "u2"], None)
    assert many["image_urls"] == ["u1", "u2"] and "image_url" not in many
    failed = build_payload("t", "failed", [], "boom")
    assert failed["error_message"] == "boom" and "image_url" not in failed and "image_urls" not in failed
    assert sign(b"{}", "s") == "sha256=" + __import__("hmac").new(b"s", b"{}", "sha256").hexdigest()


def test_device_pinning_sets_visible_devices_before_torch():
    env: dict = {}
    assert pin_device("cuda:1", env) == "cuda:0" and env["CUDA_VISIBLE_DEVICES"] == "1"
    env = {}
    assert pin_device("cpu", env) == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""
    env = {"CUDA_VISIBLE_DEVICES": "3"}
    assert pin_device("", env) == "" and env["CUDA_VISIBLE_DEVICES"] == "3"


def test_api_process_never_imports_torch_or_diffusers():
    code = ("import sys; from api import create_app; from common.settings import load_settings; "
            "create_app(load_settings(env={}));"
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_openapi_documents_the_request_schema(api):
    spec = requests.get(api.base + "/openapi.json", timeout=10).json()
    assert {"/api/v1/generate", "/api/v1/tasks/{task_id}", "/api/v1/tasks", "/health", "/api/health",
            "/api/v1/models", "/api/v1/schedulers", "/api/v1/loras"} <= set(spec["paths"])
    request = spec["components"]["schemas"]["GenerateRequest"]
    assert request["required"] == ["prompt"]
    props = request["properties"]
    assert {"prompt", "init_image", "negative_prompt", "width", "height", "num_images", "num_inference_steps",
            "guidance_scale", "strength", "scheduler", "seed", "output_format", "callback_url", "model",
            "loras"} <= set(props)
    assert props["num_images"]["maximum"] == 10 and props["num_images"]["minimum"] == 1
    assert len([e for e in props["scheduler"]["enum"] if e]) == 11   # 9 beta-schedule + 2 flow-matching
    assert spec["components"]["securitySchemes"]["ApiKeyAuth"]["name"] == "X-API-Key"
    for page in ("/docs", "/redoc"):
        response = requests.get(api.base + page, timeout=10)
        assert response.status_code == 200 and "text/html" in response.headers["Content-Type"]


def test_lora_prompt_tags():
    from common.loratags import extract_loras

    prompt, loras, problems = extract_loras("a cat, <lora:style:0.8> in a hat <LoRA:other> <lora:bad:x>")
    assert prompt == "a cat, in a hat"
    assert [(lr.name, lr.weight) for lr in loras] == [("style", 0.8), ("other", 1.0), ("bad", 1.0)]
    assert problems and "bad" in problems[0]
    assert extract_loras("no tags, <b>bold</b>") == ("no tags, <b>bold</b>", [], [])


def test_stage_prefix_serves_every_route_under_the_stage():
    from api.stage import StagePrefix

    seen = []
    app = StagePrefix(lambda environ, start: seen.append((environ["SCRIPT_NAME"], environ["PATH_INFO"])) or [], "/prod/")
    for path in ("/prod/inference/v2", "/prod", "/prod/", "/production/x", "/inference/v2"):
        app({"PATH_INFO": path, "SCRIPT_NAME": ""}, None)
    assert seen == [("/prod", "/inference/v2"), ("/prod", "/"), ("/prod", "/"), ("", "/production/x"),
                    ("", "/inference/v2")]


def test_api_refuses_private_callback_unless_allowed(tmp_path):
    from api import create_app

    env = {"SDQ_API_KEYS": "k", "SDQ_REDIS_URL": "redis://127.0.0.1:1/0", "SDQ_STORAGE_ENDPOINT_URL": "http://127.0.0.1:1",
           "SDQ_DATA_DIR": str(tmp_path)}
    client = create_app(load_settings(env=env)).test_client()
    body = {"prompt": "x", "width": 64, "height": 64, "callback_url": "http://127.0.0.1:9/cb"}
    response = client.post("/api/v1/generate", json=body, headers={"X-API-Key": "k"})
    assert response.status_code == 422
    assert response.get_json()["detail"][0]["loc"] == ["body", "callback_url"]


def test_wait_slots_answer_at_once_when_full():
    from api.waiter import EventHub, WaitersFull

    hub = EventHub(None, 1)
    assert hub._slots.acquire(blocking=False)            # the one slot is taken
    calls = []
    assert hub.wait_until("t", 30, lambda: calls.append(1) or False) is False
    assert calls == [1]                                   # answered from the current state, no waiting
    with pytest.raises(WaitersFull):                      # a synchronous call cannot answer without the result
        hub.wait_until("t", 30, lambda: False, required=True)


@pytest.mark.parametrize("overrides, message", [
    ({"m": "x"}, "expected a mapping"),
    ({"m": {"width": "abc"}}, "width"),
    ({"m": {"width": 8192}}, "width"),
    ({"m": {"steps": 0}}, "steps"),
    ({"m": {"guidance_scale": "hi"}}, "guidance_scale"),
    ({"m": {"scheduler": "Bogus"}}, "scheduler"),
    ({"m": {"family": ["sd1"]}}, "family"),
    ({"m": {"colour": "red"}}, "unknown"),
])
def test_models_overrides_are_checked_at_start(overrides, message):
    """A typo in models.overrides stops the process with its name, not every listing with a 500 later."""
    import json

    with pytest.raises(SettingsError, match=message):
        load_settings(os.devnull, env={"SDQ_MODELS_OVERRIDES": json.dumps(overrides)})


def test_removed_and_unknown_options_are_named_in_the_log(tmp_path, caplog):
    config = tmp_path / "config.yaml"
    config.write_text("defaults:\n  guidance_scale: 5\napi:\n  prot: 1\n")
    with caplog.at_level("WARNING", logger="sdqueue.settings"):
        load_settings(config, env={"SDQ_DEFAULTS_NUM_INFERENCE_STEPS": "4"})
    text = caplog.text
    assert "defaults.guidance_scale is ignored: replaced by" in text and "api.prot is ignored" in text
    assert "SDQ_DEFAULTS_NUM_INFERENCE_STEPS is ignored: replaced by" in text


def test_a_replayed_or_tampered_webhook_fails_standard_verification():
    from datetime import datetime, timedelta, timezone

    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    from worker.webhook import standard_headers

    body = b'{"task_id":"t","status":"completed"}'
    secret = "whsec_" + __import__("base64").b64encode(b"k" * 24).decode()
    Webhook(secret).verify(body, standard_headers("msg_t", body, secret))
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"completed", b"failed"), standard_headers("msg_t", body, secret))
    stale = standard_headers("msg_t", body, secret, now=datetime.now(tz=timezone.utc) - timedelta(hours=1))
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, stale)                      # a captured request replayed an hour later


def test_a_key_s_own_queue_is_a_plain_name_and_never_the_webhook_queue():
    from api.auth import parse_keys

    (key,) = parse_keys([{"key": "k", "queue": "team-a"}], reserved_queues=("callbacks",))
    assert key.queue == "team-a" and parse_keys(["plain"])[0].queue is None
    for bad in ("", "has space", 7, "x" * 64):
        with pytest.raises(ValueError, match=r"api.keys\[0\].queue"):
            parse_keys([{"key": "k", "queue": bad}])
    with pytest.raises(ValueError, match="webhook queue"):
        parse_keys([{"key": "k", "queue": "callbacks"}], reserved_queues=("callbacks",))
