"""Real jobs through the real stack: txt2img, img2img, schedulers, seeds, LoRA, formats."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from common.infotext import parse_infotext
from common.families import BETA
from common.schedulers import SCHEDULERS, schedulers_for
from tests.helpers import data_url, fetch, gradient, pixels, read_parameters


def test_txt2img_one_image_in_the_native_shape(api, storage):
    task = api.run(prompt="a beautiful sunset over the ocean", width=64, height=96, seed=42)
    assert task["status"] == "completed", task
    assert set(task) >= {"task_id", "status", "result_url", "result_urls", "error_message", "created_at", "updated_at"}
    assert task["result_url"] and task["result_urls"] is None and task["error_message"] is None
    assert task["seeds"] == [42]
    assert task["progress"]["step"] == task["progress"]["total"] > 0 and task["progress"]["fraction"] == 1.0
    assert task["created_at"] <= task["updated_at"] and len(task["created_at"]) == 19
    image = Image.open(io.BytesIO(fetch(task["result_url"])))
    assert image.format == "PNG" and image.size == (64, 96)
    assert f"/{task['task_id']}/0.png" in task["result_url"]
    assert storage.get(f"{storage.prefix}/{task['task_id']}/0.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_carries_a1111_parameters(api):
    task = api.run(prompt="a lighthouse, at dusk", negative_prompt="blurry", seed=7, guidance_scale=6.5,
                   scheduler="EulerDiscreteScheduler")
    info = parse_infotext(read_parameters(fetch(task["result_url"])))
    assert info["prompt"] == "a lighthouse, at dusk"
    assert info["negative_prompt"] == "blurry"
    assert info["Seed"] == "7" and info["Steps"] == "4" and info["CFG scale"] == "6.5"
    assert info["Size"] == "64x64" and info["Model"] == "sdq-tiny"
    assert info["Sampler"] == "EulerDiscreteScheduler"


def test_several_images_have_urls_and_consecutive_seeds(api):
    task = api.run(num_images=3, seed=100)
    assert task["result_url"] is None and len(task["result_urls"]) == 3
    assert task["seeds"] == [100, 101, 102]
    images = [fetch(u) for u in task["result_urls"]]
    assert len({pixels(b) for b in images}) == 3
    assert [parse_infotext(read_parameters(b))["Seed"] for b in images] == ["100", "101", "102"]


def test_same_seed_same_pixels_and_random_seed_is_recorded(api):
    first = api.run(prompt="a magical forest", seed=12345)
    second = api.run(prompt="a magical forest", seed=12345)
    assert pixels(fetch(first["result_url"])) == pixels(fetch(second["result_url"]))
    other = api.run(prompt="a magical forest", seed=12346)
    assert pixels(fetch(other["result_url"])) != pixels(fetch(first["result_url"]))
    random_one = api.run(prompt="a magical forest")
    seed = random_one["seeds"][0]
    assert 0 <= seed < 2**32
    replay = api.run(prompt="a magical forest", seed=seed)
    assert pixels(fetch(replay["result_url"])) == pixels(fetch(random_one["result_url"]))


def test_seed_minus_one_means_random(api):
    task = api.run(seed=-1)
    assert task["status"] == "completed" and task["seeds"][0] >= 0


@pytest.mark.parametrize("scheduler", schedulers_for(BETA))
def test_every_scheduler_works(api, scheduler):
    task = api.run(scheduler=scheduler, seed=3)
    assert task["status"] == "completed", task
    info = parse_infotext(read_parameters(fetch(task["result_url"])))
    assert info["Sampler"] == scheduler


def test_img2img_uses_init_image_size_and_strength(api):
    init = gradient(72, 64)
    task = api.run(prompt="anime style", init_image=data_url(init), strength=0.7, seed=1)
    assert task["status"] == "completed", task
    data = fetch(task["result_url"])
    assert Image.open(io.BytesIO(data)).size == (72, 64)
    assert parse_infotext(read_parameters(data))["Denoising strength"] == "0.7"
    again = api.run(prompt="anime style", init_image=data_url(init), strength=0.7, seed=1)
    assert pixels(fetch(again["result_url"])) == pixels(data)


def test_img2img_jpeg_input_odd_size_rounds_down(api):
    task = api.run(init_image=data_url(gradient(70, 67), "JPEG"), strength=0.5)
    assert task["status"] == "completed", task
    assert Image.open(io.BytesIO(fetch(task["result_url"]))).size == (64, 64)


def test_img2img_strength_zero_and_bare_base64(api):
    bare = data_url(gradient(64, 64)).split(",", 1)[1]
    task = api.run(init_image=bare, strength=0.0)
    assert task["status"] == "completed", task


@pytest.mark.parametrize("fmt,pil_format,ext", [("jpg", "JPEG", "jpg"), ("jpeg", "JPEG", "jpg"), ("webp", "WEBP", "webp")])
def test_output_formats_keep_parameters(api, fmt, pil_format, ext):
    task = api.run(output_format=fmt, seed=9)
    assert task["result_url"].split("?")[0].endswith(f"/0.{ext}")
    data = fetch(task["result_url"])
    assert Image.open(io.BytesIO(data)).format == pil_format
    assert parse_infotext(read_parameters(data))["Seed"] == "9"


def test_lora_changes_pixels_and_is_unloaded_after(api):
    base = pixels(fetch(api.run(seed=21)["result_url"]))
    styled = api.run(seed=21, loras=[{"name": "tiny_style", "weight": 1.0}])
    assert styled["status"] == "completed", styled
    styled_px = pixels(fetch(styled["result_url"]))
    assert styled_px != base
    assert "tiny_style" in parse_infotext(read_parameters(fetch(styled["result_url"])))["Lora weights"]
    half = pixels(fetch(api.run(seed=21, loras=[{"name": "tiny_style", "weight": 0.3}])["result_url"]))
    assert half not in (base, styled_px)
    assert pixels(fetch(api.run(seed=21)["result_url"])) == base


def test_broken_lora_fails_job_and_worker_keeps_serving(api):
    task = api.run(loras=[{"name": "broken"}])
    assert task["status"] == "failed"
    assert task["error_message"] and task["result_url"] is None and task["result_urls"] is None
    assert api.run()["status"] == "completed"


def test_default_size_is_models_native(api):
    task = api.run(width=None, height=None)
    assert Image.open(io.BytesIO(fetch(task["result_url"]))).size == (128, 128)


def test_other_key_cannot_see_task(api, api_b):
    task_id = api.submit()
    assert api_b.get(f"/api/v1/tasks/{task_id}").status_code == 404
    assert api_b.delete(f"/api/v1/tasks/{task_id}").status_code == 404
    assert task_id not in [t["task_id"] for t in api_b.get("/api/v1/tasks?limit=100").json()["tasks"]]
    assert api.wait(task_id)["status"] == "completed"


def test_list_tasks_newest_first_paginated(api_b):
    ids = [api_b.submit(seed=i) for i in range(3)]
    for task_id in ids:
        api_b.wait(task_id)
    page = api_b.get("/api/v1/tasks?limit=2").json()
    assert [t["task_id"] for t in page["tasks"]] == ids[::-1][:2]
    assert page["total"] >= 3 and page["limit"] == 2 and page["offset"] == 0
    nxt = api_b.get("/api/v1/tasks?limit=2&offset=2").json()
    assert nxt["tasks"][0]["task_id"] == ids[0]
    done = api_b.get("/api/v1/tasks?status=completed&limit=100").json()
    assert all(t["status"] == "completed" for t in done["tasks"]) and done["total"] >= 3


def test_catalog_endpoints(api):
    models = api.get("/api/v1/models").json()
    assert models["default"] == "sdq-tiny"
    named = {m["name"]: m for m in models["models"]}
    tiny, single = named["sdq-tiny"], named["tiny-single.safetensors"]
    family = {"family": "sd1", "family_label": "Stable Diffusion 1.x", "size_multiple": 8, "schedule": "beta",
              "negative_prompt": True, "txt2img": True, "problem": None}
    assert tiny == {"name": "sdq-tiny", "type": "diffusers", "width": 128, "height": 128, "default": True,
                    "loaded": True, **family, "defaults": {"width": 128, "height": 128, "steps": 4,
                                                           "guidance_scale": 7.5, "strength": 0.75, "scheduler": None}}
    # Single files report their family's native size; "loaded" depends on whether a job has used it yet.
    assert {k: v for k, v in single.items() if k not in ("loaded", "defaults")} == {
        "name": "tiny-single.safetensors", "type": "single_file", "width": 512, "height": 512, "default": False,
        **family}
    schedulers = api.get("/api/v1/schedulers").json()["schedulers"]
    assert [s["name"] for s in schedulers] == list(SCHEDULERS)
    assert {"name": "tiny_style", "source": "directory"} in api.get("/api/v1/loras").json()["loras"]


def test_health_reports_workers(api):
    import requests

    body = requests.get(api.base + "/health", timeout=10).json()
    assert body["model_loaded"] is True
    gpu = [w for w in body["workers"] if "gpu" in w["queues"]]
    # Models are warm as jobs used them (test_families uses several), never more than models.max_loaded.
    assert gpu and gpu[0]["models"] and gpu[0]["device"] == "cpu" and len(gpu[0]["models"]) <= 2
    known = {m["name"] for m in api.get("/api/v1/models").json()["models"]}
    assert set(gpu[0]["models"]) <= known
    assert gpu[0]["state"] in ("ready", "busy")
