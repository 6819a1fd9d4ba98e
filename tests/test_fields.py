"""No silent drops: every A1111 generation field is honoured, harmless, or refused unless its value is inert.

The table (api/dialects/a1111/fields.py) is checked against the web UI's own
request models (its field list, kept in the table's module) and against
sdqueue's schemas; then each refused value is sent to an in-process app
(Redis and S3 of the test stack; refused before anything is queued), the
web UI's defaults and the AWS extension's documented body run, and a
lenient key gets warnings instead of 422s.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import marshmallow
import pytest
import yaml

from api.auth import parse_keys
from api.dialects.a1111.fields import (OPTION_RULES, RULES, UPSTREAM_IMG2IMG, UPSTREAM_TXT2IMG, Treatment,
                                       markdown_rows, option_refusals, refusals, script_is_off)
from api.dialects.a1111.schemas import Img2ImgRequest, Txt2ImgRequest
from tests.conftest import KEY_A, KEY_B
from tests.helpers import data_url, gradient

SCHEMAS = {"txt2img": Txt2ImgRequest, "img2img": Img2ImgRequest}
UPSTREAM = {"txt2img": UPSTREAM_TXT2IMG, "img2img": UPSTREAM_IMG2IMG}
SMALL = {"prompt": "a lighthouse", "steps": 1, "width": 64, "height": 64}
IMAGE = data_url(gradient(64, 64))
# The AWS SD extension's documented /inference/v2 body (its defaults), A1111 part: what such clients always send.
AWS_DEFAULTS = {
    "enable_hr": False, "denoising_strength": None, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2.0,
    "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_sampler_name": None,
    "hr_prompt": "", "hr_negative_prompt": "", "prompt": "", "styles": [], "seed": -1, "subseed": -1,
    "subseed_strength": 0.0, "seed_resize_from_h": 0, "seed_resize_from_w": 0, "sampler_name": "Euler a",
    "batch_size": 1, "n_iter": 1, "steps": 28, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": False,
    "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "", "eta": None,
    "s_min_uncond": 0.0, "s_churn": 0.0, "s_tmax": 1.0, "s_tmin": 0.0, "s_noise": 1.0, "override_settings": {},
    "override_settings_restore_afterwards": True, "script_args": [], "sampler_index": "Euler a", "script_name": None,
    "send_images": True, "save_images": False,
    "alwayson_scripts": {"controlnet": {"args": [{"enabled": False, "module": "none", "model": "None", "weight": 1,
                                                  "image": None, "resize_mode": "Crop and Resize"}]},
                         "extra options": {"args": []}},
}


def defaults(mode: str) -> dict[str, Any]:
    """What the schema fills in for a field a request leaves out (the web UI's defaults)."""
    out = {}
    for name, field in SCHEMAS[mode]._declared_fields.items():
        default = field.load_default
        if default is not marshmallow.missing:
            out[name] = default() if callable(default) else default
    return out


def with_images(value: Any) -> Any:
    """An example with its "<image>" placeholders replaced by a real image."""
    if value == "<image>":
        return IMAGE
    if isinstance(value, list):
        return [with_images(v) for v in value]
    if isinstance(value, dict):
        return {k: with_images(v) for k, v in value.items()}
    return value


def refused_examples():
    for mode, rules in RULES.items():
        for name, rule in rules.items():
            if rule.example is not None:
                yield pytest.param(mode, name, id=f"{mode}-{name}")


# --- the table itself (no app) ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_every_field_of_the_web_uis_request_models_is_classified(mode):
    rules = RULES[mode]
    assert set(UPSTREAM[mode]) <= set(rules), "a field of the web UI's request model is not classified"
    assert set(SCHEMAS[mode]._declared_fields) == set(rules), "the schema and the table disagree"
    for name, rule in rules.items():
        assert rule.treatment in Treatment and rule.note, name
        if rule.treatment is Treatment.UNSUPPORTED:
            assert rule.example is not None, f"{name}: an unsupported field names a value that is refused"


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_the_web_uis_defaults_are_never_refused(mode):
    assert refusals(defaults(mode), mode) == []
    assert refusals({**defaults("txt2img"), **AWS_DEFAULTS}, "txt2img") == []


@pytest.mark.parametrize("mode, name", list(refused_examples()))
def test_each_example_is_refused_by_name_and_its_default_is_not(mode, name):
    rule = RULES[mode][name]
    data = {**defaults(mode), **rule.context, name: rule.example}
    assert name in {r.path[0] for r in refusals(data, mode)}
    usual = defaults(mode).get(name, ["<image>"])      # init_images has no default: one image is the usual
    assert name not in {r.path[0] for r in refusals({**data, name: usual}, mode)}


def test_settings_of_a_feature_pass_while_it_is_off():
    data = {**defaults("txt2img"), "hr_checkpoint_name": "other", "hr_scale": 4.0, "s_tmax": 5.0, "script_args": [1],
            "subseed": 99, "seed_resize_from_h": 768}
    assert refusals(data, "txt2img") == []
    on = {r.name for r in refusals({**data, "enable_hr": True, "s_churn": 0.3}, "txt2img")}
    assert on == {"hr_checkpoint_name", "s_churn", "s_tmax"}   # the defaults of the rest pass; hr_scale is run


def test_scripts_that_are_off_pass_and_scripts_that_are_on_are_named():
    assert script_is_off({"args": []}) and script_is_off({}) and script_is_off({"args": [False, "x"]})
    assert script_is_off({"args": [{"enabled": False}, {"enabled": False}]})
    assert not script_is_off({"args": [{"enabled": True}]}) and not script_is_off({"args": [{"model": "x"}]})
    assert not script_is_off({"args": [True, 0.5]})
    found = refusals({**defaults("txt2img"), "alwayson_scripts": {
        "ControlNet": {"args": [{"enabled": True}]}, "ADetailer": {"args": [True, {}]}, "Refiner": {"args": [False]}}},
        "txt2img")
    assert {r.name: r.note for r in found} == {          # ControlNet is run (its units are screened on their own)
        "alwayson_scripts.ADetailer": "the 'ADetailer' script is not run by sdqueue"}


def test_controlnet_unit_settings_sdqueue_does_not_run_are_named():
    units = [{"model": "a", "control_mode": "My prompt is more important"}, {"model": "b", "pixel_perfect": True},
             {"model": "c", "enabled": False, "control_mode": 1}, {"model": "d", "control_mode": 2}]
    found = refusals({**defaults("txt2img"), "alwayson_scripts": {"controlnet": {"args": units}}}, "txt2img")
    assert {r.name for r in found} == {"alwayson_scripts.controlnet.args.0.control_mode",
                                       "alwayson_scripts.controlnet.args.1.pixel_perfect",
                                       "alwayson_scripts.controlnet.args.3.control_mode"}   # 2 mixed with 0
    agreed = [{"model": "a", "control_mode": "ControlNet is more important"}, {"model": "b", "control_mode": 2}]
    assert refusals({**defaults("txt2img"), "alwayson_scripts": {"controlnet": {"args": agreed}}}, "txt2img") == []


def test_override_settings_are_run_passed_or_refused():
    data = {"override_settings": {"sd_model_checkpoint": "x", "samples_format": "jpg", "sd_vae": "Automatic",
                                  "CLIP_stop_at_last_layers": 1}}
    assert option_refusals(data) == {}
    data["override_settings"].update(CLIP_stop_at_last_layers=2, some_extension_option=True)
    assert set(option_refusals(data)) == {"CLIP_stop_at_last_layers", "some_extension_option"}
    assert all(rule.note for rule in OPTION_RULES.values())


def test_the_compatibility_page_shows_the_table():
    page = (Path(__file__).resolve().parents[1] / "docs" / "compat" / "a1111.md").read_text()
    missing = [row for row in markdown_rows() if row not in page]
    assert not missing, "docs/compat/a1111.md lacks these rows of the field table:\n" + "\n".join(missing)


def test_a_key_may_be_lenient_or_strict_whatever_the_default():
    plain, lenient, strict = parse_keys(["k1", {"key": "k2", "lenient": True}, {"key": "k3", "lenient": False}])
    assert (plain.is_lenient(False), plain.is_lenient(True)) == (False, True)
    assert lenient.is_lenient(False) and not strict.is_lenient(True)
    with pytest.raises(ValueError, match=r"api.keys\[0\].lenient"):
        parse_keys([{"key": "k", "lenient": "yes"}])


# --- the dialects, on an in-process app ---------------------------------------------------------------------
KEY_STRICT = "test-key-strict-13579246"   # lenient: false while api.lenient is true
KEY_LOOSE = "test-key-loose-97531864"     # lenient: true while api.lenient is false


def make_app(stack, tmp_path_factory, **env: str):
    from api import create_app
    from common.settings import load_settings

    config = tmp_path_factory.mktemp("fields") / "config.yaml"
    config.write_text(yaml.safe_dump({"api": {"keys": [{"key": KEY_STRICT, "lenient": False},
                                                       {"key": KEY_LOOSE, "lenient": True}]}}))
    keys = ",".join([KEY_A, KEY_B, KEY_STRICT, KEY_LOOSE])
    return create_app(load_settings(env={**stack.env(), "SDQ_CONFIG": str(config), "SDQ_API_KEYS": keys, **env}))


@pytest.fixture(scope="module")
def client(stack, tmp_path_factory):
    return make_app(stack, tmp_path_factory).test_client()


@pytest.fixture(scope="module")
def lenient_client(stack, tmp_path_factory):
    return make_app(stack, tmp_path_factory, SDQ_API_LENIENT="1").test_client()


def a1111(client, mode: str, body: dict, key: str = KEY_A):
    base = {**SMALL, **({"init_images": [IMAGE]} if mode == "img2img" else {})}
    return client.post(f"/sdapi/v1/{mode}", json={**base, **body}, headers={"X-API-Key": key})


@pytest.mark.parametrize("mode, name", list(refused_examples()))
def test_a_value_that_would_change_the_image_is_a_422_naming_the_field(client, mode, name):
    rule = RULES[mode][name]
    r = a1111(client, mode, {**with_images(rule.context), name: with_images(rule.example)})
    assert r.status_code == 422, r.get_data(as_text=True)
    detail = r.get_json()["detail"]
    named = [e for e in detail if e["loc"][:2] == ["body", name]]
    assert named and "would change the image" in named[0]["msg"], detail
    if rule.entries is None:
        assert rule.note in named[0]["msg"]
    else:                                        # a dict field names the entry
        assert named[0]["loc"][2] in rule.example


def test_the_aws_extensions_documented_defaults_run(client):
    body = {**AWS_DEFAULTS, **SMALL, "prompt": "a cute panda"}
    r = a1111(client, "txt2img", body)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert json.loads(r.get_json()["info"])["warnings"] == []


def test_a_lenient_key_runs_without_them_and_names_each_in_warnings(lenient_client):
    body = {"restore_faces": True, "tiling": True, "firstphase_width": 256, "styles": ["cinematic"],
            "alwayson_scripts": {"ADetailer": {"args": [True, {}]}},
            "override_settings": {"CLIP_stop_at_last_layers": 2}, "subseed_strength": 0.3}
    r = a1111(lenient_client, "txt2img", body)
    assert r.status_code == 200, r.get_data(as_text=True)
    warnings = json.loads(r.get_json()["info"])["warnings"]
    named = {w.split(":", 1)[0] for w in warnings}
    assert named == {"restore_faces", "tiling", "firstphase_width", "styles", "alwayson_scripts.ADetailer",
                     "override_settings.CLIP_stop_at_last_layers", "subseed_strength"}
    assert all(w.endswith("(accepted for a lenient key)") for w in warnings)
    assert len(r.get_json()["images"]) == 1


def test_lenience_is_per_key(client, lenient_client):
    strict = a1111(lenient_client, "txt2img", {"tiling": True}, key=KEY_STRICT)
    assert strict.status_code == 422 and strict.get_json()["detail"][0]["loc"] == ["body", "tiling"]
    loose = a1111(client, "img2img", {"init_images": [IMAGE, IMAGE], "denoising_strength": 0.5}, key=KEY_LOOSE)
    assert loose.status_code == 200, loose.get_data(as_text=True)
    assert json.loads(loose.get_json()["info"])["warnings"] == [
        "init_images: only the first init image is used; a batch of several is not supported "
        "(accepted for a lenient key)"]


def test_sd_on_eks_refuses_in_its_own_shape(client):
    scripts = {"task": "text-to-image", "sd_model_checkpoint": "sdq-tiny", "id_task": "refused-cn", "uid": "1",
               "ADetailer": {"args": [True, {}]}}
    r = client.post("/", json={**SMALL, "restore_faces": True, "alwayson_scripts": scripts},
                    headers={"X-API-Key": KEY_A})
    assert r.status_code == 400, r.get_data(as_text=True)
    message = r.get_json()["message"]
    assert "restore_faces: face restoration is not run" in message
    assert "alwayson_scripts.ADetailer: the 'ADetailer' script is not run by sdqueue" in message
    links = {**scripts, "task": "image-to-image", "id_task": "two-links", "ADetailer": {"args": []},
             "image_link": "https://example.com/a.png,https://example.com/b.png"}
    r = client.post("/", json={**SMALL, "alwayson_scripts": links}, headers={"X-API-Key": KEY_A})
    assert r.status_code == 400 and r.get_json()["message"].startswith("alwayson_scripts.image_link: a job has one")


def test_the_aws_extension_refuses_in_its_own_shape(client):
    body = {"task_type": "txt2img", "models": {"Stable-diffusion": ["sdq-tiny"]}, "sagemaker_endpoint_name": "gpu",
            **SMALL, "tiling": True}
    r = client.post("/inference/v2", json=body, headers={"X-API-Key": KEY_A})
    assert r.status_code == 422, r.get_data(as_text=True)
    assert r.get_json()["detail"][0]["loc"] == ["body", "tiling"]


def test_a_lenient_sd_on_eks_job_lists_what_it_ran_without_in_its_side_file(lenient_client, storage):
    from api.auth import ApiKey
    from tests.test_dialects import wait_for_objects

    id_task = "lenient-" + str(time.time_ns())
    scripts = {"task": "text-to-image", "sd_model_checkpoint": "sdq-tiny", "id_task": id_task}
    r = lenient_client.post("/", json={**SMALL, "tiling": True, "alwayson_scripts": scripts},
                            headers={"X-API-Key": KEY_A})
    assert r.status_code == 200, r.get_data(as_text=True)
    prefix = f"outputs/{ApiKey(KEY_A, 'a').owner}/{id_task}/"
    side = next(k for k in wait_for_objects(storage, prefix, 2, timeout=120) if k.endswith(".out"))
    assert json.loads(storage.get(side))["warnings"] == [
        "tiling: tileable images are not supported (accepted for a lenient key)"]


def test_disable_extra_networks_strips_lora_tags_without_applying_them(client):
    body = {"prompt": "a fox <lora:tiny_style:0.9> <lora:missing:1>", "seed": 5, "disable_extra_networks": True}
    info = json.loads(a1111(client, "txt2img", body).get_json()["info"])
    assert info["prompt"] == "a fox" and "Lora weights" not in info["infotexts"][0] and info["warnings"] == []


def test_eta_passes_where_it_changes_nothing():
    """Clients such as webuiapi always send eta=1.0: inert for ancestral samplers, ignored by the others."""
    from api.dialects.a1111.fields import eta_inert

    assert eta_inert(1.0, {"sampler_name": "Euler a"}) and eta_inert(None, {"sampler_name": "Euler a"})
    assert not eta_inert(0.5, {"sampler_name": "Euler a"})
    assert eta_inert(0, {"sampler_index": "DDIM"}) and not eta_inert(1, {"sampler_index": "DDIM"})
    assert eta_inert(0.5, {"sampler_name": "DPM++ 2M Karras"})          # a deterministic sampler takes no eta
    assert eta_inert(1.0, {}) and not eta_inert(0.3, {})
