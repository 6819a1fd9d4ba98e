"""ControlNet: sd-webui-controlnet's units and routes, the native `controlnet` list, the worker's ControlNet views.

Real stack, tiny models: the tiny ControlNets (dev/tinymodel.py) have random
zero convolutions, so a unit visibly changes the image; weight 0 must leave
it exactly as without ControlNet.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from common.catalog import find_model
from common.jobspec import JobSpec
from tests.conftest import KEY_B
from tests.helpers import data_url, fetch
from tests.test_a1111 import decode, sd  # noqa: F401 - the A1111 client fixture

SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 3, "seed": 11}


def square(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill="white")
    return image


def b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def unit(**extra) -> dict:
    return {"enabled": True, "image": b64(square()), "module": "none", "model": "sdq-tiny-cn", **extra}


def a1111_image(sd, units: list[dict] | None, path: str = "txt2img", **extra) -> np.ndarray:
    body = {**SMALL, **extra}
    if units is not None:
        body["alwayson_scripts"] = {"controlnet": {"args": units}}
    r = sd.post(path, body)
    assert r.status_code == 200, r.text
    return np.asarray(decode(r.json()["images"][0]).convert("RGB")).astype(int)


# --- the worker's parts -----------------------------------------------------------------------------------
def test_canny_finds_the_edges_of_a_synthetic_square():
    from worker.controlnet import canny

    edges = np.asarray(canny(square(64)))[:, :, 0]
    assert set(np.unique(edges)) <= {0, 255}
    assert edges[32, 15:18].max() == 255 and edges[15:18, 32].max() == 255     # the left and top sides
    assert edges[28:36, 28:36].max() == 0 and edges[:8, :8].max() == 0          # flat inside and outside
    assert np.asarray(canny(square(64), 5000, 6000)).max() == 0                 # thresholds above every gradient


def test_resize_modes_fit_a_control_image_as_the_extension_does():
    from worker.controlnet import fit

    wide = Image.new("RGB", (128, 64), "white")
    assert fit(wide, 64, 64, "just_resize").size == (64, 64)
    assert np.asarray(fit(wide, 64, 64, "crop_and_resize")).min() == 255        # covered: all image
    filled = np.asarray(fit(wide, 64, 64, "resize_and_fill", (0, 0, 0)))
    assert filled[0].max() == 0 and filled[32].min() == 255                    # fitted inside, padded above


def weights(*modules) -> dict:
    import torch

    return {(id(m), n): (t.dtype, t.data_ptr()) for m in modules if isinstance(m, torch.nn.Module)
            for n, t in m.state_dict().items()}


@pytest.mark.parametrize("model, controlnets", [("sdq-tiny", ["sdq-tiny-cn", "sdq-tiny-cn-b"]),
                                                ("sdq-tiny-xl", ["sdq-tiny-xl-cn"])])
def test_the_controlnet_view_shares_the_base_weights_in_bfloat16(settings, model, controlnets):
    import torch

    from worker.controlnet import controlnet_models
    from worker.generation import generate
    from worker.registry import load_pipeline

    pipe = load_pipeline(find_model(settings.models_dir, model), "cpu", None, "bfloat16")
    units = [{"model": name, "image_key": "in/c.png", "scale": 1.0, "start": 0.0, "end": 1.0, "preprocessor": "canny",
              "low": 100, "high": 200, "processor_res": 64, "resize_mode": "crop_and_resize"} for name in controlnets]
    base = dict(prompt="a fox", model=model, width=64, height=64, num_inference_steps=2, guidance_scale=7, seed=1,
                controlnet=units)
    jobs = [JobSpec(**base), JobSpec(**base, init_image_key="in/i.png", strength=0.7),
            JobSpec(**base, init_image_key="in/i.png", mask_image_key="in/m.png", strength=0.7)]
    models = controlnet_models(pipe, jobs[0], settings.controlnet_dir)
    before = weights(*pipe.components.values(), *models)
    assert {dtype for dtype, _ in before.values()} == {torch.bfloat16}
    for spec in jobs:
        again = controlnet_models(pipe, spec, settings.controlnet_dir)
        assert all(a is b for a, b in zip(again, models))                     # kept warm with the base
        result = generate(pipe, spec, square(), {}, lambda *a: {}, Image.new("L", (64, 64), 255), None,
                          (again, [square()] * len(units)))
        assert result.images[0].size == (64, 64), spec.mode
        assert weights(*pipe.components.values(), *models) == before, spec.mode


# --- the extension's routes and the native listing ----------------------------------------------------------
def test_model_list_module_list_and_version(stack, api):
    session = requests.Session()
    session.auth = ("anyone", api.key)
    models = session.get(f"{stack.api_url}/controlnet/model_list", timeout=30).json()["model_list"]
    names = {m.split(" [")[0] for m in models}
    assert {"sdq-tiny-cn", "sdq-tiny-cn-b", "sdq-tiny-xl-cn"} <= names
    assert all(m.endswith("]") and len(m.split(" [")[1]) == 9 for m in models)
    modules = session.get(f"{stack.api_url}/controlnet/module_list", timeout=30).json()
    assert modules["module_list"] == ["none", "canny"] and "canny" in modules["module_detail"]
    assert session.get(f"{stack.api_url}/controlnet/version", timeout=30).json() == {"version": 2}
    assert requests.get(f"{stack.api_url}/controlnet/model_list", timeout=30).status_code == 401
    listed = {c["name"]: c for c in api.get("/api/v1/models").json()["controlnets"]}
    assert listed["sdq-tiny-xl-cn"]["family"] == "sdxl" and listed["sdq-tiny-cn"]["family"] == "sd1"


# --- A1111 units ---------------------------------------------------------------------------------------------
def test_a_unit_changes_the_image_and_weight_zero_equals_none(sd):
    none = a1111_image(sd, None)
    one = a1111_image(sd, [unit()])
    assert np.abs(one - none).mean() > 1
    assert np.array_equal(a1111_image(sd, [unit(weight=0)]), none)
    assert np.array_equal(a1111_image(sd, [unit(enabled=False)]), none)
    by_title = sd.get("../../controlnet/model_list").json()["model_list"]
    title = next(t for t in by_title if t.startswith("sdq-tiny-cn ["))
    assert np.array_equal(a1111_image(sd, [unit(model=title)]), one)          # "name [hash]" as the extension lists


def test_two_units_at_once_and_canny_through_the_api(sd):
    one = a1111_image(sd, [unit()])
    two = a1111_image(sd, [unit(), unit(model="sdq-tiny-cn-b", weight=0.8)])
    assert np.abs(two - one).mean() > 1
    canny = a1111_image(sd, [unit(module="canny", threshold_a=50, threshold_b=150, processor_res=64)])
    assert np.abs(canny - one).mean() > 1                                      # edges, not the square itself
    alias = unit(module="canny", threshold_a=50, threshold_b=150, processor_res=64)
    alias["input_image"] = alias.pop("image")
    assert np.array_equal(a1111_image(sd, [alias]), canny)


def test_img2img_and_inpainting_with_a_unit(sd):
    init = b64(Image.new("RGB", (64, 64), "teal"))
    plain = a1111_image(sd, None, "img2img", init_images=[init], denoising_strength=0.7)
    controlled = a1111_image(sd, [unit()], "img2img", init_images=[init], denoising_strength=0.7)
    assert np.abs(controlled - plain).mean() > 1
    own = a1111_image(sd, [{"enabled": True, "model": "sdq-tiny-cn"}], "img2img", init_images=[init],
                      denoising_strength=0.7)                                  # no image: the init image
    assert np.abs(own - plain).mean() > 1
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    inpainted = a1111_image(sd, [unit()], "img2img", init_images=[init], mask=b64(mask), denoising_strength=0.9)
    assert inpainted.shape == (64, 64, 3)


def test_unknown_model_or_module_is_a_422_naming_the_field(sd):
    r = sd.post("txt2img", {**SMALL, "alwayson_scripts": {"controlnet": {"args": [unit(model="nope [12345678]")]}}})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "alwayson_scripts", "controlnet", "args", 0, "model"]
    r = sd.post("txt2img", {**SMALL, "alwayson_scripts": {"controlnet": {"args": [unit(module="depth_midas")]}}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "module", r.text
    assert "depth_midas" in r.json()["detail"][0]["msg"]
    r = sd.post("txt2img", {**SMALL, "alwayson_scripts": {"controlnet": {"args": [unit(control_mode=1)]}}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "control_mode", r.text
    r = sd.post("txt2img", {**SMALL, "enable_hr": True, "alwayson_scripts": {"controlnet": {"args": [unit()]}}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "enable_hr"], r.text
    xl = sd.post("txt2img", {**SMALL, "override_settings": {"sd_model_checkpoint": "sdq-tiny-xl"},
                             "alwayson_scripts": {"controlnet": {"args": [unit()]}}})
    assert xl.status_code == 422 and "Stable Diffusion XL" in xl.json()["detail"][0]["msg"], xl.text


# --- the native API ---------------------------------------------------------------------------------------
def native_pixels(api, **body) -> np.ndarray:
    task = api.run(prompt="a lighthouse", seed=5, **body)
    assert task["status"] == "completed", task
    return np.asarray(Image.open(io.BytesIO(fetch(task["result_url"]))).convert("RGB")).astype(int)


def test_native_controlnet_txt2img_img2img_and_sdxl(api):
    image = data_url(square())
    none = native_pixels(api)
    one = native_pixels(api, controlnet=[{"model": "sdq-tiny-cn", "image": image}])
    assert np.abs(one - none).mean() > 1
    assert np.array_equal(native_pixels(api, controlnet=[{"model": "sdq-tiny-cn", "image": image, "scale": 0}]), none)
    init = data_url(Image.new("RGB", (64, 64), "teal"))
    plain = native_pixels(api, init_image=init, strength=0.7)
    controlled = native_pixels(api, init_image=init, strength=0.7,
                               controlnet=[{"model": "sdq-tiny-cn", "image": image, "preprocessor": "canny",
                                            "end": 0.8}])
    assert np.abs(controlled - plain).mean() > 1
    xl = dict(model="sdq-tiny-xl", width=128, height=128, num_inference_steps=3)
    xl_none = native_pixels(api, **xl)
    xl_one = native_pixels(api, **xl, controlnet=[{"model": "sdq-tiny-xl-cn", "image": data_url(square(128))}])
    assert xl_one.shape == (128, 128, 3) and np.abs(xl_one - xl_none).mean() > 1


def test_native_refusals_name_the_field(api):
    image = data_url(square())
    r = api.post("/api/v1/generate", {"prompt": "x", "controlnet": [{"model": "missing", "image": image}]})
    assert r.status_code == 422 and "controlnet" in r.text and "missing" in r.text, r.text
    r = api.post("/api/v1/generate", {"prompt": "x", "controlnet": [{"model": "sdq-tiny-cn", "image": image,
                                                                      "preprocessor": "openpose"}]})
    assert r.status_code == 422 and "preprocessor" in r.text and "openpose" in r.text, r.text
    r = api.post("/api/v1/generate", {"prompt": "x", "controlnet": [{"model": "sdq-tiny-cn"}]})
    assert r.status_code == 422 and "image" in r.text, r.text                  # txt2img: a unit needs its image


def test_control_images_belong_to_their_task_and_cannot_be_named_by_another_key(api, settings, storage):
    task_id = api.submit(controlnet=[{"model": "sdq-tiny-cn", "image": data_url(square())}])
    key = storage.input_key(task_id, "control0.png")
    assert storage.get(key)                                                    # under the task's own input prefix
    assert api.wait(task_id)["status"] == "completed"
    for reference in (key, f"s3://{settings.storage.bucket}/{key}", storage.url_for(key)):
        r = api.post("/api/v1/generate", {"prompt": "x", "controlnet": [{"model": "sdq-tiny-cn", "image": reference}]},
                     key=KEY_B)
        assert r.status_code == 422 and "image" in r.text, r.text
        r = requests.post(f"{api.base}/sdapi/v1/txt2img", auth=("b", KEY_B), timeout=60, json={
            **SMALL, "alwayson_scripts": {"controlnet": {"args": [unit(image=reference)]}}})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "image", r.text
    assert api.get(f"/api/v1/tasks/{task_id}", key=KEY_B).status_code == 404


def test_a_single_file_controlnet_loads_with_a_config_made_from_the_base_unet(settings, tmp_path):
    import shutil

    import torch

    from common.controlnets import list_controlnets
    from worker.controlnet import load_controlnet
    from worker.registry import load_pipeline

    for model, name in (("sdq-tiny", "sdq-tiny-cn"), ("sdq-tiny-xl", "sdq-tiny-xl-cn")):
        folder = settings.controlnet_dir / name
        shutil.copyfile(folder / "diffusion_pytorch_model.safetensors", tmp_path / f"{name}-file.safetensors")
        info = list_controlnets(tmp_path)[f"{name}-file"]
        assert info.kind == "single_file" and info.group == ("sdxl" if "xl" in name else "sd")
        pipe = load_pipeline(find_model(settings.models_dir, model), "cpu", None, "float32")
        loaded = load_controlnet(pipe, info).state_dict()
        reference = load_controlnet(pipe, list_controlnets(settings.controlnet_dir)[name]).state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_the_webuiapi_clients_controlnet_helper_works(stack):
    """The `webuiapi` package's ControlNetUnit (what many A1111 clients use), unchanged, against sdqueue."""
    import webuiapi

    from tests.conftest import KEY_A

    client = webuiapi.WebUIApi(baseurl=f"{stack.api_url}/sdapi/v1", username="anyone", password=KEY_A)
    name = next(m for m in client.controlnet_model_list() if m.startswith("sdq-tiny-cn ["))
    assert "canny" in client.controlnet_module_list()
    control = webuiapi.ControlNetUnit(image=square(), module="canny", model=name, threshold_a=100, threshold_b=200,
                                      processor_res=64)   # at 512 the 64-px square's edges thin out to almost nothing
    body = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 3, "seed": 11}
    # Fresh `alwayson_scripts` each call: webuiapi's default for it is one dict that it fills in place.
    without = client.txt2img(**body, alwayson_scripts={})
    with_unit = client.txt2img(**body, controlnet_units=[control], alwayson_scripts={})
    assert with_unit.image.size == without.image.size == (64, 64)
    difference = np.abs(np.asarray(with_unit.image, dtype=int) - np.asarray(without.image, dtype=int)).mean()
    assert difference > 1
