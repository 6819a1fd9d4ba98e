"""SDXL, SD3 and Flux next to SD 1.x through the real stack: every dialect, sizes, defaults, refusals.

Why tiny random-weight variants (dev/tinymodel.py): they are the families'
real pipeline classes and configs (two or three text encoders, 16-channel
VAEs, flow-matching schedulers, 1024² native sizes), built offline and
loaded by the code path that loads real checkpoints, so every job here runs
what a GPU worker runs. Few steps and small sizes keep them fast on 2 cores.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import requests
from PIL import Image

from common.infotext import parse_infotext
from tests.conftest import KEY_A
from tests.helpers import data_url, fetch, gradient, pixels, read_parameters, wait_until

XL, SD3, FLUX, SCHNELL, REFINER = "sdq-tiny-xl", "sdq-tiny-sd3", "sdq-tiny-flux", "sdq-tiny-flux-schnell", \
    "sdq-tiny-xl-refiner"
FAMILY_MODELS = {XL: "sdxl", SD3: "sd3", FLUX: "flux"}
QUICK = {"width": 128, "height": 96, "num_inference_steps": 2}
HEADERS = {"X-API-Key": KEY_A}


def image_of(url: str) -> Image.Image:
    image = Image.open(io.BytesIO(fetch(url)))
    image.load()
    return image


def a1111(stack, path: str, body: dict) -> requests.Response:
    return requests.post(f"{stack.api_url}/sdapi/v1/{path}", json=body, auth=("anyone", KEY_A), timeout=300)


def decoded(b64: str) -> Image.Image:
    import base64

    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def detail_fields(response: requests.Response) -> list[str]:
    return [entry["loc"][-1] for entry in response.json()["detail"]]


# --- the catalog ------------------------------------------------------------------------------
def test_each_family_is_detected_and_listed_with_its_defaults(api, stack):
    models = {m["name"]: m for m in api.get("/api/v1/models").json()["models"]}
    expect = {
        XL: ("sdxl", 1024, 8, "beta", 30, 7.0, True),
        SD3: ("sd3", 1024, 16, "flow", 28, 7.0, True),
        FLUX: ("flux", 1024, 16, "flow", 28, 3.5, False),
        SCHNELL: ("flux", 1024, 16, "flow", 4, 0.0, False),      # schnell: no guidance embedding
        "tiny-xl-single.safetensors": ("sdxl", 1024, 8, "beta", 30, 7.0, True),
    }
    for name, (family, size, multiple, schedule, steps, guidance, negative) in expect.items():
        m = models[name]
        assert (m["family"], m["width"], m["height"], m["size_multiple"], m["schedule"]) == \
            (family, size, size, multiple, schedule), name
        assert (m["defaults"]["steps"], m["defaults"]["guidance_scale"], m["negative_prompt"]) == \
            (steps, guidance, negative), name
        assert m["txt2img"] and m["problem"] is None
    assert models[REFINER]["family"] == "sdxl-refiner" and models[REFINER]["txt2img"] is False
    sd_models = requests.get(f"{stack.api_url}/sdapi/v1/sd-models", auth=("anyone", KEY_A), timeout=30).json()
    assert {m["model_name"]: m["family"] for m in sd_models}[XL] == "sdxl"
    schedulers = {s["name"]: s["schedule"] for s in api.get("/api/v1/schedulers").json()["schedulers"]}
    assert schedulers["FlowMatchEulerDiscreteScheduler"] == "flow" and schedulers["DDIMScheduler"] == "beta"


# --- native -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", list(FAMILY_MODELS))
def test_native_txt2img_and_img2img_of_every_family(api, model):
    first = api.run(model=model, prompt="a lighthouse at dusk", seed=11, **QUICK)
    again = api.run(model=model, prompt="a lighthouse at dusk", seed=11, **QUICK)
    assert first["status"] == again["status"] == "completed", first
    data = fetch(first["result_url"])
    image = Image.open(io.BytesIO(data))
    assert image.size == (128, 96)
    assert pixels(data) == pixels(fetch(again["result_url"]))           # a fixed seed is a fixed image
    info = parse_infotext(read_parameters(data))
    assert info["Model"] == model and info["Size"] == "128x96" and info["Steps"] == "2"
    # img2img: the init image's size, rounded down to the family's multiple (8 for SDXL, 16 for SD3 and Flux)
    task = api.run(model=model, prompt="a lighthouse, oil painting", init_image=data_url(gradient(200, 136)),
                   strength=0.6, seed=5, num_inference_steps=3)
    assert task["status"] == "completed", task
    multiple = 8 if model == XL else 16
    assert image_of(task["result_url"]).size == (200 // multiple * multiple, 136 // multiple * multiple)


def test_a_request_without_values_gets_the_models_defaults(api):
    """FLUX.1 [schnell]: 1024² at 4 steps with no guidance, with nothing but a prompt."""
    task = api.run(model=SCHNELL, prompt="a red kite", num_inference_steps=None, width=None, height=None)
    assert task["status"] == "completed", task
    data = fetch(task["result_url"])
    assert Image.open(io.BytesIO(data)).size == (1024, 1024)
    info = parse_infotext(read_parameters(data))
    assert info["Steps"] == "4" and info["CFG scale"] == "0.0"


@pytest.mark.parametrize("body, field", [
    ({"model": FLUX, "width": 200}, "width"),                                  # Flux sides: multiples of 16
    ({"model": SD3, "height": 136}, "height"),
    ({"model": SD3, "scheduler": "DDIMScheduler"}, "scheduler"),              # beta schedule on a flow model
    ({"model": XL, "scheduler": "FlowMatchEulerDiscreteScheduler"}, "scheduler"),   # and the reverse
    ({"model": FLUX, "scheduler": "FlowMatchHeunDiscreteScheduler"}, "scheduler"),  # Flux drives Euler only
    ({"model": FLUX, "negative_prompt": "blurry"}, "negative_prompt"),         # Flux has no negative prompt
    ({"model": REFINER}, "model"),                                             # a refiner does not start images
    ({"model": SD3, "refiner": REFINER}, "refiner"),                           # a refiner follows SDXL only
    ({"model": XL, "refiner": FLUX}, "refiner"),
])
def test_what_a_model_cannot_do_is_a_422_naming_the_field(api, body, field):
    r = api.post("/api/v1/generate", {"prompt": "x", **QUICK, **body})
    assert r.status_code == 422, r.text
    assert field in detail_fields(r), r.text


def test_sdxl_refiner_pass_finishes_the_base_images(api):
    plain = api.run(model=XL, prompt="a castle", seed=3, **QUICK)
    refined = api.run(model=XL, prompt="a castle", seed=3, refiner=REFINER, refiner_switch=0.5, **QUICK)
    assert refined["status"] == "completed", refined
    data = fetch(refined["result_url"])
    assert Image.open(io.BytesIO(data)).size == (128, 96)
    assert pixels(data) != pixels(fetch(plain["result_url"]))
    info = parse_infotext(read_parameters(data))
    assert info["Refiner"] == REFINER and info["Refiner switch at"] == "0.5"


def test_an_sdxl_lora_changes_the_image_and_leaves_the_model_clean(api):
    plain = api.run(model=XL, prompt="a harbour", seed=9, **QUICK)
    styled = api.run(model=XL, prompt="a harbour", seed=9, loras=[{"name": "tiny_xl_style", "weight": 1.0}], **QUICK)
    after = api.run(model=XL, prompt="a harbour", seed=9, **QUICK)
    assert styled["status"] == "completed", styled
    assert pixels(fetch(styled["result_url"])) != pixels(fetch(plain["result_url"]))
    assert pixels(fetch(after["result_url"])) == pixels(fetch(plain["result_url"]))


def test_an_sd1_lora_on_an_sdxl_model_is_refused_by_name(api):
    r = api.post("/api/v1/generate", {"prompt": "x", "model": XL, **QUICK, "loras": [{"name": "tiny_style"}]})
    assert r.status_code == 422 and "loras" in r.text and "tiny_style" in r.text, r.text


def test_an_sdxl_single_file_makes_the_folders_images(api):
    """A civitai-style SDXL file loads with SDXL's class and the configs of a same-architecture folder."""
    folder = api.run(model=XL, prompt="a fox", seed=21, **QUICK)
    single = api.run(model="tiny-xl-single.safetensors", prompt="a fox", seed=21, **QUICK)
    assert single["status"] == "completed", single
    assert pixels(fetch(single["result_url"])) == pixels(fetch(folder["result_url"]))


def test_a_flux_transformer_file_runs_in_its_family_folder(api):
    """Flux and SD3 fine-tunes ship the transformer alone: the rest comes from a folder of that architecture
    (dev, with a guidance embedder, not schnell)."""
    models = {m["name"]: m for m in api.get("/api/v1/models").json()["models"]}
    assert models["tiny-flux-transformer.safetensors"]["family"] == "flux"
    folder = api.run(model=FLUX, prompt="a fox", seed=21, **QUICK)
    single = api.run(model="tiny-flux-transformer.safetensors", prompt="a fox", seed=21, **QUICK)
    assert single["status"] == "completed", single
    assert pixels(fetch(single["result_url"])) == pixels(fetch(folder["result_url"]))


def test_a_single_file_borrows_configs_only_from_its_own_architecture(settings, tmp_path):
    from common.checkpoint_keys import architecture_matches, checkpoint_shapes

    def header_file(name: str, shapes: dict[str, list[int]]) -> Path:
        header = {key: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]} for key, shape in shapes.items()}
        raw = json.dumps(header).encode()
        path = tmp_path / name
        path.write_bytes(len(raw).to_bytes(8, "little") + raw)
        return path

    models = settings.models_dir
    real_xl = header_file("xl.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
                                             "model.diffusion_model.x.attn2.to_k.weight": [640, 2048]})
    assert not architecture_matches(checkpoint_shapes(real_xl), models / "sdq-tiny-xl")   # a real SDXL, a tiny folder
    assert architecture_matches(checkpoint_shapes(models / "tiny-xl-single.safetensors"), models / "sdq-tiny-xl")
    real_flux = header_file("flux.safetensors", {"img_in.weight": [3072, 64], "guidance_in.in_layer.weight": [1, 1]})
    assert not architecture_matches(checkpoint_shapes(real_flux), models / "sdq-tiny-flux")
    tiny_flux = checkpoint_shapes(models / "tiny-flux-transformer.safetensors")
    assert architecture_matches(tiny_flux, models / "sdq-tiny-flux")
    assert not architecture_matches(tiny_flux, models / "sdq-tiny-flux-schnell")   # dev weights, schnell config


# --- A1111 and the dialects that carry its bodies ----------------------------------------------
@pytest.mark.parametrize("model", list(FAMILY_MODELS))
def test_a1111_txt2img_and_img2img_of_every_family(stack, model):
    override = {"sd_model_checkpoint": model}
    r = a1111(stack, "txt2img", {"prompt": "a tower", "seed": 7, "steps": 2, "width": 128, "height": 96,
                                 "sampler_name": "Euler", "override_settings": override})
    assert r.status_code == 200, r.text
    image = decoded(r.json()["images"][0])
    assert image.size == (128, 96)
    info = json.loads(r.json()["info"])
    assert info["sampler_name"] == "Euler" and info["sd_model_name"] == model
    text = parse_infotext(image.info["parameters"])
    assert text["Model"] == model and text["Sampler"] == "Euler"
    r = a1111(stack, "img2img", {"prompt": "a tower", "seed": 7, "steps": 3, "init_images": [data_url(gradient(160, 120))],
                                 "denoising_strength": 0.5, "override_settings": override})
    assert r.status_code == 200, r.text
    multiple = 8 if model == XL else 16
    assert decoded(r.json()["images"][0]).size == (160 // multiple * multiple, 120 // multiple * multiple)
    assert r.json()["parameters"]["width"] == 160 // multiple * multiple   # echoed as it ran


def test_a1111_omitted_values_follow_the_model(stack):
    r = a1111(stack, "txt2img", {"prompt": "a kite", "override_settings": {"sd_model_checkpoint": SCHNELL}})
    assert r.status_code == 200, r.text
    params = r.json()["parameters"]
    assert (params["width"], params["height"], params["steps"], params["cfg_scale"]) == (1024, 1024, 4, 0.0)
    assert decoded(r.json()["images"][0]).size == (1024, 1024)


def test_a1111_samplers_map_per_family(stack):
    override = {"sd_model_checkpoint": FLUX}
    small = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "override_settings": override}
    r = a1111(stack, "txt2img", {**small, "sampler_name": "DPM++ 2M"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "sampler_name", r.text
    r = a1111(stack, "txt2img", {**small, "sampler_name": "Euler", "scheduler": "SGM Uniform"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "scheduler", r.text
    r = a1111(stack, "txt2img", {**small, "negative_prompt": "blurry"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "negative_prompt", r.text
    r = a1111(stack, "txt2img", {**small, "sampler_name": "Heun"})    # Flux's pipeline drives Euler only
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "sampler_name", r.text
    r = a1111(stack, "txt2img", {**small, "sampler_name": "Euler", "scheduler": "Karras"})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["extra_generation_params"] == {"Schedule type": "Karras"}
    r = a1111(stack, "txt2img", {**small, "sampler_name": "Heun", "override_settings": {"sd_model_checkpoint": SD3}})
    assert r.status_code == 200, r.text


def test_a1111_refiner_checkpoint_runs_the_refiner_pass(stack):
    body = {"prompt": "a castle", "seed": 3, "steps": 2, "width": 128, "height": 96,
            "override_settings": {"sd_model_checkpoint": XL}}
    plain = a1111(stack, "txt2img", body)
    refined = a1111(stack, "txt2img", {**body, "refiner_checkpoint": REFINER, "refiner_switch_at": 0.5})
    assert refined.status_code == 200, refined.text
    assert pixels(decoded_bytes(refined.json()["images"][0])) != pixels(decoded_bytes(plain.json()["images"][0]))
    assert not any("refiner" in w for w in json.loads(refined.json()["info"])["warnings"])
    missing = a1111(stack, "txt2img", {**body, "refiner_checkpoint": "nope"})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"][-1] == "refiner_checkpoint"


def decoded_bytes(b64: str) -> bytes:
    import base64

    return base64.b64decode(b64)


@pytest.mark.parametrize("model", list(FAMILY_MODELS))
def test_sd_on_eks_and_the_aws_extension_run_every_family(stack, storage, model):
    from tests.test_aws import headers, wait_job
    from tests.test_dialects import EKS_BODY, wait_for_objects

    multiple = 8 if model == XL else 16
    for task, extra in (("text-to-image", {}), ("image-to-image", {"init_images": [data_url(gradient(200, 136))]})):
        id_task = f"family-{model}-{task}"
        body = {**EKS_BODY, "steps": 2, "width": 128, "height": 96, **extra,
                "alwayson_scripts": {**EKS_BODY["alwayson_scripts"], "task": task, "sd_model_checkpoint": model,
                                     "id_task": id_task}}
        r = requests.post(stack.api_url + "/", json=body, headers=HEADERS, timeout=30)
        assert r.status_code == 200, r.text
        folder = r.json()["output_location"].split("/", 3)[3]   # {save_dir}/{owner}/{id_task}
        keys = wait_for_objects(storage, f"{folder}/", 2)
        assert Image.open(io.BytesIO(storage.get(keys[0]))).size == (128, 96)   # A1111 bodies name the size

    for task_type, extra in (("txt2img", {}), ("img2img", {"init_images": [data_url(gradient(200, 136))],
                                                            "width": None, "height": None})):
        body = {"task_type": task_type, "models": {"Stable-diffusion": [model]}, "sagemaker_endpoint_name": "gpu",
                "prompt": "a panda", "steps": 2, "width": 128, "height": 96, "seed": 4, **extra}
        r = requests.post(f"{stack.api_url}/inference/v2", headers=headers(body=True), json=body, timeout=30)
        assert r.status_code == 200, r.text
        job = wait_job(stack.api_url, r.json()["inference_id"])
        assert job["status"] == "succeed", job
    # the img2img without a size ran at the init image's, rounded to the family's multiple
    urls = requests.get(f"{stack.api_url}/inference/get-inference-job-image-output",
                        params={"jobID": job["InferenceJobId"]}, headers=headers()).json()
    assert image_of(urls[0]).size == (200 // multiple * multiple, 136 // multiple * multiple)


def test_draw_scales_the_ratio_to_the_models_native_area(stack):
    r = requests.post(f"{stack.api_url}/v1/draw", json={"prompt": "a kite", "size": "16:9", "model": SCHNELL},
                      headers={"Authorization": f"Bearer {KEY_A}"}, timeout=300)
    assert r.status_code == 200, r.text
    # 1024² area at 16:9, sides multiples of 16: 1024·√(16/9) ≈ 1365 → 1360; 1024·√(9/16) = 768
    assert image_of(r.json()["urls"][0]).size == (1360, 768)


def test_health_names_the_family_of_each_warm_model(api, stack):
    api.run(model=XL, prompt="x", **QUICK)
    workers = requests.get(f"{stack.api_url}/health", timeout=10).json()["workers"]
    gpu = next(w for w in workers if XL in w["models"])
    assert gpu["families"][XL] == "sdxl"


def test_an_uploaded_checkpoint_s_family_is_read_from_its_header_in_s3(settings, storage):
    """The AWS extension's uploads are still in S3 when a job names them: two ranged reads give the family."""
    from types import SimpleNamespace

    from api.uploads import uploaded_model

    key = "models/Stable-diffusion/upload-1/xl.safetensors"
    storage.put(key, (settings.models_dir / "tiny-xl-single.safetensors").read_bytes(), "application/octet-stream")
    svc = SimpleNamespace(storage=storage, settings=settings, catalog=SimpleNamespace(overrides={}))
    model = uploaded_model(svc, {"key": key, "name": "xl.safetensors"})
    assert (model.family, model.request_defaults.width, model.request_defaults.steps) == ("sdxl", 1024, 30)
    storage.put("models/x/not.safetensors", b"garbage", "application/octet-stream")
    assert uploaded_model(svc, {"key": "models/x/not.safetensors", "name": "not.safetensors"}).family == "sd1"


# --- what the review found: odd files, odd bodies, odd configuration --------------------------
def test_a_broken_checkpoint_is_listed_with_its_problem_and_breaks_nothing(api, stack, settings):
    import time

    broken = settings.models_dir / "broken-header.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": None, "data_offsets": [0, 0]}}).encode()
    broken.write_bytes(len(header).to_bytes(8, "little") + header)
    try:
        time.sleep(2.5)                                           # the API re-reads the directory every 2 s
        models = {m["name"]: m for m in api.get("/api/v1/models").json()["models"]}
        assert "cannot be read" in models["broken-header.safetensors"]["problem"]
        assert requests.get(f"{stack.api_url}/health", timeout=10).status_code == 200
        r = api.post("/api/v1/generate", {"prompt": "x", "model": "broken-header.safetensors", **QUICK})
        assert r.status_code == 422 and "model" in detail_fields(r)
        assert api.run(prompt="still fine", **QUICK)["status"] == "completed"
    finally:
        broken.unlink()
        wait_until(lambda: "broken-header.safetensors" not in {m["name"] for m in api.get("/api/v1/models").json()[
            "models"]}, timeout=30, what="the listing without the removed file")   # the next test sees it gone


def test_a1111_sizes_stay_within_the_limits_after_rounding(stack):
    override = {"sd_model_checkpoint": XL}
    r = a1111(stack, "txt2img", {"prompt": "x", "width": 2063, "height": 64, "steps": 1})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "width", r.text
    r = a1111(stack, "img2img", {"prompt": "x", "steps": 1, "init_images": [data_url(gradient(2400, 64))],
                                 "override_settings": override})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "init_images", r.text


def test_a_refiner_pass_needs_a_step_on_each_side(api, stack):
    r = api.post("/api/v1/generate", {"prompt": "x", "model": XL, "refiner": REFINER, **QUICK,
                                      "num_inference_steps": 1})
    assert r.status_code == 422 and "refiner" in detail_fields(r)
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": XL},
            "refiner_checkpoint": REFINER}
    assert a1111(stack, "txt2img", {**body, "refiner_switch_at": 1.0}).status_code == 200   # 1: no refiner pass
    r = a1111(stack, "txt2img", {**body, "refiner_switch_at": 0})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "refiner_switch_at"


def test_sd3_heun_takes_no_sigma_schedule_and_says_so(stack):
    r = a1111(stack, "txt2img", {"prompt": "x", "steps": 2, "width": 64, "height": 64, "sampler_name": "Heun",
                                 "scheduler": "Karras", "override_settings": {"sd_model_checkpoint": SD3}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "scheduler", r.text


def test_variants_and_lora_targets_are_read_from_weight_names():
    from common.checkpoint_keys import variant_from_keys

    assert variant_from_keys("flux", ["double_blocks.0.img_attn.norm.key_norm.scale"]) == \
        {"steps": 4, "guidance_scale": 0.0}                                           # schnell: no guidance_in
    assert variant_from_keys("flux", ["double_blocks.0.x", "guidance_in.in_layer.weight"]) == {}
    assert variant_from_keys("sd3", ["joint_blocks.0.x_block.attn.ln_q.weight"]) == {"guidance_scale": 4.5}
    assert variant_from_keys("sd3", ["joint_blocks.0.x_block.attn.qkv.weight"]) == {}
    assert variant_from_keys("sdxl", ["anything"]) == {}


def test_a_lora_of_the_other_transformer_family_is_not_refused_by_guesswork(settings, tmp_path):
    from common.catalog import find_model, lora_problem

    def lora(name: str, keys: list[str]) -> Path:
        header = json.dumps({k: {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 0]} for k in keys}).encode()
        path = tmp_path / name
        path.write_bytes(len(header).to_bytes(8, "little") + header)
        return path

    flux, sd3 = find_model(settings.models_dir, FLUX), find_model(settings.models_dir, SD3)
    blocks_only = lora("blocks.safetensors", ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"])
    assert lora_problem(blocks_only, flux) is None and lora_problem(blocks_only, sd3) is None
    flux_only = lora("flux.safetensors", ["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"])
    assert lora_problem(flux_only, flux) is None and "Flux" in lora_problem(flux_only, sd3)
    assert "SD3 or Flux" in lora_problem(blocks_only, find_model(settings.models_dir, XL))


def test_a_refiner_job_reports_progress_on_one_scale(settings):
    """Both passes count toward the job's steps: progress only grows, and the total never changes."""
    from common.catalog import find_model
    from common.jobspec import JobSpec
    from worker.generation import generate
    from worker.registry import load_pipeline

    seen = []

    class Monitor:
        def on_shared_step(self, step, total):
            seen.append((step, total))

    base = load_pipeline(find_model(settings.models_dir, XL), "cpu", None, "float32")
    refiner = load_pipeline(find_model(settings.models_dir, REFINER), "cpu", None, "float32")
    spec = JobSpec(prompt="a castle", model=XL, width=64, height=64, num_inference_steps=6, guidance_scale=7.0,
                   seed=1, num_images=2, batch_size=1, refiner=REFINER, refiner_switch=0.5)
    result = generate(base, spec, None, {}, Monitor(), refiner=refiner)
    assert len(result.images) == 2
    assert {total for _, total in seen} == {12} and [step for step, _ in seen] == list(range(1, len(seen) + 1))
    assert seen[-1][0] >= 10
