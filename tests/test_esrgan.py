"""ESRGAN-class upscalers: both key layouts, scale inference, tiling, the listing without torch, and the
hires fix with a model upscaler on the real stack (tests/test_hires.py covers the other upscalers)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from common.infotext import parse_infotext
from common.upscalers import describe_model_upscaler, list_model_upscalers
from dev.tinymodel import as_old_esrgan_keys, build_tiny_upscaler, tiny_rrdb_state
from tests.test_a1111 import decode, sd  # noqa: F401 - the A1111 client fixture
from tests.test_hires import png
from worker.esrgan import as_basicsr_keys, build_network, infer_shape, load_network, run_tiled, upscale_once, \
    upscale_to

TINY = "sdq-tiny-esrgan-x4"
SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 3, "seed": 11}



def picture(width: int, height: int) -> Image.Image:
    """A picture with detail (a gradient and a square), so upscalers have something to differ on."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    image.paste((200, 40, 90), (width // 4, height // 4, width // 2, height // 2))
    return image


# --- the network, without the stack ---------------------------------------------------------------------------
def test_both_key_layouts_load_the_same_network(tmp_path: Path):
    new = load_network(build_tiny_upscaler(tmp_path / "a.pth", "realesrgan"))
    old = load_network(build_tiny_upscaler(tmp_path / "b.pth", "esrgan"))
    assert new.shape == old.shape and new.scale == 4
    x = torch.rand(1, 3, 12, 10)
    with torch.inference_mode():
        assert torch.equal(new(x), old(x))
    assert as_basicsr_keys(as_old_esrgan_keys(tiny_rrdb_state())).keys() == tiny_rrdb_state().keys()


def test_safetensors_and_params_wrappers_load(tmp_path: Path):
    state = tiny_rrdb_state()
    save_file(state, str(tmp_path / "c.safetensors"))
    torch.save({"params": state}, tmp_path / "d.pth")
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():
        assert torch.equal(load_network(tmp_path / "c.safetensors")(x), load_network(tmp_path / "d.pth")(x))


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_scale_and_depth_are_read_from_the_weights(scale: int):
    state = tiny_rrdb_state(scale=scale)
    shape = infer_shape(state)
    assert (shape.scale, shape.num_block, shape.num_feat, shape.num_grow_ch) == (scale, 1, 8, 4)
    network = build_network(state)
    assert upscale_once(network, picture(15, 10)).size == (15 * scale, 10 * scale)   # odd sides: padded, cropped


def test_an_old_x2_esrgan_has_one_upsampling_conv():
    state = as_old_esrgan_keys(tiny_rrdb_state())
    state.pop("model.6.weight"), state.pop("model.6.bias")   # x2: model.3 up, model.5 hr, model.7 last
    state["model.5.weight"], state["model.5.bias"] = state.pop("model.8.weight"), state.pop("model.8.bias")
    state["model.7.weight"], state["model.7.bias"] = state.pop("model.10.weight"), state.pop("model.10.bias")
    network = build_network(state)
    assert network.scale == 2 and upscale_once(network, picture(8, 6)).size == (16, 12)


def test_tiles_cover_the_image_like_one_pass():
    network = build_network(tiny_rrdb_state())
    x = torch.rand(1, 3, 40, 36)
    with torch.inference_mode():
        whole, tiled = run_tiled(network, x, tile=64), run_tiled(network, x, tile=16, overlap=8)
    assert tiled.shape == whole.shape == (1, 3, 160, 144)
    assert torch.allclose(tiled, whole, atol=1e-5)     # 1 block: its receptive field fits in the overlap


def test_upscale_to_reaches_the_exact_size():
    network = build_network(tiny_rrdb_state())
    assert upscale_to(network, picture(16, 16), 40, 24).size == (40, 24)     # x4 once, then Lanczos down
    assert upscale_to(network, picture(4, 4), 100, 100).size == (100, 100)   # x4 twice, then Lanczos


def test_the_listing_reads_names_without_torch(tmp_path: Path):
    build_tiny_upscaler(tmp_path / "real.pth", "realesrgan")
    build_tiny_upscaler(tmp_path / "old.pth", "esrgan")
    save_file(tiny_rrdb_state(scale=2), str(tmp_path / "x2.safetensors"))
    save_file({"not.an.upscaler": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "Lanczos.pth").write_bytes((tmp_path / "old.pth").read_bytes())   # a built-in's name: left out
    found = list_model_upscalers(tmp_path)
    assert sorted(found) == ["old", "real", "x2"]
    assert (found["old"].model_name, found["old"].scale) == ("ESRGAN", 4)
    assert (found["real"].model_name, found["real"].scale) == ("RealESRGAN", None)   # .pth: names only
    assert (found["x2"].model_name, found["x2"].scale) == ("RealESRGAN", 2)            # safetensors: shapes
    assert describe_model_upscaler(tmp_path / "other.safetensors") is None


# --- A1111 on the real stack ---------------------------------------------------------------------------------
def test_upscalers_list_the_model_files(sd):
    items = {u["name"]: u for u in sd.get("upscalers").json()}
    assert list(items)[:3] == ["None", "Lanczos", "Nearest"]
    assert items[TINY]["model_name"] == "RealESRGAN" and items[TINY]["model_path"].endswith(f"{TINY}.pth")
    assert items[f"{TINY}-old"]["model_name"] == "ESRGAN" and items[f"{TINY}-old"]["scale"] == 4
    assert set(items[TINY]) == {"name", "model_name", "model_path", "model_url", "scale"}


def test_hires_with_a_model_upscaler(sd):
    r = sd.post("txt2img", {**SMALL, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2,
                            "hr_upscaler": TINY})
    assert r.status_code == 200, r.text
    image = decode(r.json()["images"][0])
    assert image.size == (96, 96)                  # x4 by the model, then Lanczos to the hires size
    assert parse_infotext(image.info["parameters"])["Hires upscaler"] == TINY
    lanczos = sd.post("txt2img", {**SMALL, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2,
                                  "hr_upscaler": "Lanczos"})
    assert decode(lanczos.json()["images"][0]).tobytes() != image.tobytes()   # the model really ran


def test_unknown_upscalers_are_refused(sd):
    r = sd.post("txt2img", {**SMALL, "enable_hr": True, "hr_upscaler": "not-a-model"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "hr_upscaler"], r.text
    r = sd.post("extra-single-image", {"image": png(40, 32), "upscaler_1": "Lanczos", "upscaler_2": "not-a-model",
                                       "extras_upscaler_2_visibility": 0.5})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "upscaler_2"], r.text
    r = sd.post("extra-single-image", {"image": png(40, 32), "upscaler_1": TINY, "gfpgan_visibility": 0.5})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "gfpgan_visibility"], r.text
    r = sd.post("extra-single-image", {"image": png(40, 32), "upscaler_1": TINY, "upscaling_resize": 4,
                                       "resize_mode": 1, "upscaling_resize_w": 4096, "upscaling_resize_h": 64})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "upscaling_resize_w"], r.text


# --- the extras with a model upscaler: a queued job ------------------------------------------------------------
def test_extra_single_image_with_a_model_upscaler(sd):
    body = {"image": png(40, 32), "upscaling_resize": 2, "upscaler_1": TINY}
    r = sd.post("extra-single-image", body)
    assert r.status_code == 200, r.text
    image = decode(r.json()["image"])
    assert image.size == (80, 64)                 # x4 by the model, then Lanczos to the requested size
    assert f"Postprocess upscaler: {TINY}" in r.json()["html_info"]
    assert "Postprocess upscale by: 2" in r.json()["html_info"]
    assert image.info["parameters"] == r.json()["html_info"][3:-4]    # the same entries, in the PNG
    lanczos = sd.post("extra-single-image", {**body, "upscaler_1": "Lanczos"})
    assert decode(lanczos.json()["image"]).tobytes() != image.convert("RGB").tobytes()   # the model really ran
    r = sd.post("extra-single-image", {**body, "resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 50})
    assert r.status_code == 200, r.text
    assert decode(r.json()["image"]).size == (100, 50)   # to a size, centre cropped
    assert "Postprocess crop to: 100x50" in r.json()["html_info"]


def test_extra_batch_images_with_a_model_upscaler(sd):
    r = sd.post("extra-batch-images", {"imageList": [{"data": png(40, 32), "name": "a.png"},
                                                     {"data": png(16, 16, "red"), "name": "b.png"}],
                                       "upscaling_resize": 2, "upscaler_1": f"{TINY}-old"})
    assert r.status_code == 200, r.text
    assert [decode(image).size for image in r.json()["images"]] == [(80, 64), (32, 32)]
    assert f"Postprocess upscaler: {TINY}-old" in r.json()["html_info"]


def test_a_model_upscaler_blended_in_as_upscaler_2(sd):
    body = {"image": png(40, 32), "upscaling_resize": 2, "upscaler_1": "Nearest", "upscaler_2": TINY,
            "extras_upscaler_2_visibility": 0.5}
    r = sd.post("extra-single-image", body)
    assert r.status_code == 200, r.text
    image = decode(r.json()["image"])
    assert image.size == (80, 64)
    assert f"Postprocess upscaler 2: {TINY}" in r.json()["html_info"]
    nearest = sd.post("extra-single-image", {**body, "extras_upscaler_2_visibility": 0})
    assert "Postprocess upscaler 2" not in nearest.json()["html_info"]
    assert decode(nearest.json()["image"]).tobytes() != image.convert("RGB").tobytes()


def test_an_extras_job_runs_alone_without_a_pipeline():
    from common.extras import FIELDS
    from common.jobspec import JobSpec

    data = {"upscaler_1": TINY, "upscaler_2": "None", "extras_upscaler_2_visibility": 0, "resize_mode": 0,
            "upscaling_resize": 2, "upscaling_resize_w": 512, "upscaling_resize_h": 512, "upscaling_crop": True}
    assert set(data) == set(FIELDS)
    spec = JobSpec(prompt="", model="m", width=80, height=64, num_inference_steps=0, guidance_scale=0, seed=0,
                   extras={**data, "image_keys": ["k"]})
    assert spec.mode == "extras" and spec.batch_key() == ""
    assert JobSpec.from_json(spec.to_json()).extras == spec.extras
