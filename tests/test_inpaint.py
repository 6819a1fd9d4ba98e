"""Inpainting as the web UI does it: the mask prepared at the API, the overlay and fill at the worker, and
the native API's mask_image through the real stack."""
from __future__ import annotations

import base64
import io
from dataclasses import replace

import pytest
from PIL import Image, ImageChops, ImageStat

from api.init_image import image_from_bytes
from api.inpaint import binary_mask, crop_region, expand_region, plan_inpaint
from common.jobspec import JobSpec
from tests.helpers import data_url, fetch, gradient
from worker.inpaint import filled, inpaint_inputs, paste_back

SPEC = dict(prompt="x", model="m", width=64, height=64, num_inference_steps=2, guidance_scale=7.0, seed=1,
            init_image_key="i", mask_image_key="m")


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def left_half_mask(width: int = 64, height: int = 64) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    return mask


def mean_difference(a: Image.Image, b: Image.Image, box: tuple[int, int, int, int]) -> float:
    diff = ImageChops.difference(a.convert("RGB").crop(box), b.convert("RGB").crop(box))
    return sum(ImageStat.Stat(diff).mean) / 3


# --- the mask, at the API -----------------------------------------------------------------------------------
def test_the_region_is_grown_to_the_generation_sizes_shape_inside_the_image():
    assert expand_region((0, 0, 128, 32), 512, 512, 512, 512) == (0, 0, 128, 128)     # the web UI's own example
    assert expand_region((400, 10, 500, 60), 512, 512, 512, 512) == (400, 0, 500, 100)
    assert expand_region((10, 10, 20, 20), 64, 32, 100, 100) == (5, 10, 25, 20)
    mask = Image.new("L", (100, 80), 0)
    mask.paste(255, (40, 30, 50, 40))
    assert crop_region(mask, 8) == (32, 22, 58, 48) and crop_region(Image.new("L", (8, 8)), 4) is None


def test_a_transparent_canvas_mask_is_its_alpha():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 255))
    assert binary_mask(rgba).getpixel((1, 1)) == 255 and binary_mask(rgba).getpixel((0, 0)) == 0


def test_the_plan_is_the_whole_picture_or_the_region_around_the_mask():
    init = image_from_bytes(png(gradient(96, 64)))
    small = Image.new("L", (96, 64), 0)
    small.paste(255, (70, 20, 80, 30))
    mask = image_from_bytes(png(small))
    whole = plan_inpaint(mask, init, 48, 32, blur_x=0, blur_y=0)
    assert whole.area is None and Image.open(io.BytesIO(whole.mask_png)).size == (48, 32)
    region = plan_inpaint(mask, init, 48, 32, blur_x=0, blur_y=0, only_masked=True, padding=4, fill="fill")
    assert region.area == [62, 16, 89, 34] and region.fill == "fill"               # 3:2, as the 48x32 it runs at
    assert Image.open(io.BytesIO(region.mask_png)).size == (96, 64)                # at the init image's size
    inverted = plan_inpaint(mask, init, 96, 64, blur_x=0, blur_y=0, invert=True)
    assert Image.open(io.BytesIO(inverted.mask_png)).getpixel((0, 0)) == 255
    blurred = Image.open(io.BytesIO(plan_inpaint(mask, init, 96, 64, blur_x=4, blur_y=0).mask_png))
    assert 0 < blurred.getpixel((68, 25)) < 255 and blurred.getpixel((75, 17)) == 0   # across only


# --- the overlay and the fill, at the worker -------------------------------------------------------------------
def test_unmasked_pixels_are_the_originals_and_masked_ones_the_outputs():
    init, mask = gradient(64, 64), left_half_mask()
    spec = JobSpec(**SPEC)
    image, pipe_mask, overlay = inpaint_inputs(spec, init, mask)
    assert image.size == pipe_mask.size == (64, 64)
    output = paste_back(Image.new("RGB", (64, 64), (255, 0, 0)), overlay)
    assert mean_difference(output, init, (32, 0, 64, 64)) == 0
    assert output.crop((0, 0, 32, 64)).getcolors() == [(32 * 64, (255, 0, 0))]


def test_only_masked_repaints_the_region_and_answers_at_the_init_images_size():
    init, mask = gradient(96, 64), Image.new("L", (96, 64), 0)
    mask.paste(255, (64, 16, 80, 32))
    spec = JobSpec(**{**SPEC, "width": 32, "height": 32}, inpaint_area=[56, 8, 88, 40])
    image, pipe_mask, overlay = inpaint_inputs(spec, init, mask)
    assert image.size == (32, 32) and pipe_mask.getbbox() == (8, 8, 24, 24)
    output = paste_back(Image.new("RGB", (32, 32), (255, 0, 0)), overlay)
    assert output.size == (96, 64)
    assert mean_difference(output, init, (0, 0, 56, 64)) == 0 and output.getpixel((70, 20)) == (255, 0, 0)


def test_fill_paints_the_masked_area_from_around_it():
    init = Image.new("RGB", (64, 64), (0, 0, 255))
    init.paste((255, 255, 0), (16, 16, 48, 48))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = filled(init, mask)
    assert out.getpixel((0, 0)) == (0, 0, 255)                         # unmasked: untouched
    red, green, blue = out.getpixel((32, 32))
    assert blue > 200 and red < 50                                      # masked: the surrounding blue, not yellow
    image, _, _ = inpaint_inputs(JobSpec(**SPEC, inpaint_fill="fill"), init, mask)
    assert image.getpixel((32, 32))[2] > 200


def test_a_family_without_inpainting_is_refused_by_the_mask_field():
    from api.modelfit import NATIVE_FIELDS, fit_errors
    from common.families import PROFILES

    class Model:
        name, problem, profile = "m", None, replace(PROFILES["sd1"], inpaint=False)

    errors = fit_errors(Model(), "inpaint", 64, 64, names=NATIVE_FIELDS)
    assert list(errors) == ["mask_image"] and "cannot inpaint" in errors["mask_image"][0]
    assert fit_errors(Model(), "img2img", 64, 64) == {}


# --- the native API ---------------------------------------------------------------------------------------------
def test_native_mask_image_is_validated_like_init_image(api):
    mask = data_url(left_half_mask())
    alone = api.post("/api/v1/generate", {"prompt": "x", "mask_image": mask})
    assert alone.status_code == 422 and alone.json()["detail"][0]["loc"] == ["body", "mask_image"], alone.text
    huge = data_url(Image.new("L", (5000, 4000)))
    r = api.post("/api/v1/generate", {"prompt": "x", "init_image": data_url(gradient(64, 64)), "mask_image": huge})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "mask_image"], r.text
    assert "limits.max_image_pixels" in r.json()["detail"][0]["msg"]
    bad = api.post("/api/v1/generate", {"prompt": "x", "init_image": data_url(gradient(64, 64)), "mask_image": mask,
                                        "masked_content": "latent noise", "mask_blur": 99})
    assert {tuple(e["loc"]) for e in bad.json()["detail"]} == {("body", "masked_content"), ("body", "mask_blur")}
    refined = api.post("/api/v1/generate", {"prompt": "x", "init_image": data_url(gradient(64, 64)),
                                            "mask_image": mask, "model": "sdq-tiny-xl", "refiner": "sdq-tiny-xl"})
    assert refined.status_code == 422 and refined.json()["detail"][0]["loc"] == ["body", "refiner"], refined.text


@pytest.mark.parametrize("masked_content", ["original", "fill"])
def test_native_inpainting_keeps_the_unmasked_pixels_and_repaints_the_masked_ones(api, masked_content):
    init = gradient(64, 64)
    task = api.run(prompt="a red apple", init_image=data_url(init), mask_image=data_url(left_half_mask()),
                   mask_blur=0, strength=1.0, masked_content=masked_content, num_inference_steps=3, seed=11)
    assert task["status"] == "completed", task
    out = Image.open(io.BytesIO(fetch(task["result_url"]))).convert("RGB")
    assert out.size == (64, 64)
    assert mean_difference(out, init, (32, 0, 64, 64)) < 1.0          # kept: the init image's pixels
    assert mean_difference(out, init, (0, 0, 32, 64)) > 10.0          # masked: repainted
    assert "Denoising strength: 1" in out.info["parameters"]


def test_a1111_mask_as_base64_still_inpaints(stack):
    import requests

    from tests.conftest import KEY_A

    init, mask = gradient(64, 64), left_half_mask()
    body = {"prompt": "x", "init_images": [data_url(init)], "mask": base64.b64encode(png(mask)).decode(),
            "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False, "steps": 3, "width": 64,
            "height": 64, "denoising_strength": 1.0}
    r = requests.post(f"{stack.api_url}/sdapi/v1/img2img", json=body, auth=("x", KEY_A), timeout=120)
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
    assert mean_difference(out, init, (32, 0, 64, 64)) < 1.0 and mean_difference(out, init, (0, 0, 32, 64)) > 10.0


@pytest.mark.parametrize("model", ["sdq-tiny-xl", "sdq-tiny-sd3", "sdq-tiny-flux"])
def test_native_inpainting_runs_on_every_family(api, model):
    init = gradient(64, 64)
    task = api.run(prompt="a kite", model=model, init_image=data_url(init), mask_image=data_url(left_half_mask()),
                   mask_blur=0, strength=1.0, num_inference_steps=2, seed=3, negative_prompt=None)
    assert task["status"] == "completed", task
    out = Image.open(io.BytesIO(fetch(task["result_url"]))).convert("RGB")
    assert out.size == (64, 64) and mean_difference(out, init, (32, 0, 64, 64)) < 1.0
