"""The hires fix and the upscalers: A1111's enable_hr / hr_* fields, /upscalers and the extras routes.

The sizes are checked against the web UI's own arithmetic; the jobs run on
the real stack's worker with the tiny models (SD 1.x and SDXL), and a
direct run counts both passes on one progress scale.
"""
from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from common.infotext import parse_infotext
from common.jobspec import JobSpec
from common.upscalers import extras_size, hires_size
from tests.test_a1111 import decode, sd  # noqa: F401 - the A1111 client fixture

SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 3, "seed": 11}


def png(width: int, height: int, colour: str = "teal") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- the web UI's arithmetic (no stack) -------------------------------------------------------------------
def sizes(*args) -> tuple[int, int, int, int]:
    """hires_size as (upscale width, upscale height, output width, output height)."""
    size = hires_size(*args)
    return size.upscale_width, size.upscale_height, size.width, size.height


def test_hires_sizes_follow_the_web_ui():
    assert sizes(512, 512, 2.0, 0, 0, 8) == (1024, 1024, 1024, 1024)
    assert sizes(512, 768, 1.5, 0, 0, 8) == (768, 1152, 768, 1152)
    assert sizes(64, 64, 1.3, 0, 0, 8) == (80, 80, 80, 80)               # floored to the latent grid
    assert sizes(512, 768, 2, 1024, 0, 8) == (1024, 1536, 1024, 1536)    # one side keeps the aspect ratio
    assert sizes(512, 768, 2, 0, 1024, 8) == (680, 1024, 680, 1024)
    assert sizes(512, 512, 2, 1024, 768, 8) == (1024, 1024, 1024, 768)   # both: cover, then keep the centre
    assert sizes(512, 512, 1.9, 0, 0, 16) == (960, 960, 960, 960)        # SD3 / Flux: multiples of 16


def test_extras_sizes_follow_the_web_ui():
    assert extras_size(40, 32, 0, 2, 0, 0) == (80, 64)
    assert extras_size(40, 30, 0, 2, 0, 0) == (80, 56)                  # Upscaler.upscale floors to 8
    assert extras_size(40, 32, 1, 0, 100, 50) == (96, 80)               # the larger ratio, floored; then cropped


def test_a_hires_job_runs_alone():
    spec = JobSpec(prompt="x", model="m", width=64, height=64, num_inference_steps=2, guidance_scale=5, seed=1)
    assert spec.batch_key() != ""
    hires = {"upscaler": "Latent", "upscale_width": 128, "upscale_height": 128, "width": 128, "height": 128,
             "steps": 0, "strength": 0.5}
    assert JobSpec(**{**spec.to_dict(), "hires": hires}).batch_key() == ""
    assert JobSpec.from_json(JobSpec(**{**spec.to_dict(), "hires": hires}).to_json()).hires == hires


def test_both_passes_count_on_one_progress_scale(settings):
    from common.catalog import find_model
    from worker.generation import generate
    from worker.registry import load_pipeline

    class Seen:
        def __init__(self):
            self.steps: list[tuple[int, int]] = []

        def on_shared_step(self, step: int, total: int) -> None:
            self.steps.append((step, total))

    pipe = load_pipeline(find_model(settings.models_dir, "sdq-tiny"), "cpu", None, "float32")
    hires = {"upscaler": "Lanczos", "upscale_width": 128, "upscale_height": 128, "width": 128, "height": 96,
             "steps": 4, "strength": 0.5}
    spec = JobSpec(prompt="x", model="sdq-tiny", width=64, height=64, num_inference_steps=3, guidance_scale=5,
                   seed=1, scheduler="EulerDiscreteScheduler", hires=hires)
    seen = Seen()
    result = generate(pipe, spec, None, {}, seen)
    assert [image.size for image in result.images] == [(128, 96)]
    assert seen.steps[-1] == (5, 5) and len(seen.steps) == 3 + 2     # 3 first-pass steps, then 4 x 0.5


# --- A1111 on the real stack ---------------------------------------------------------------------------------
def test_hires_output_has_the_upscaled_size_and_its_infotext(sd):
    r = sd.post("txt2img", {**SMALL, "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 2,
                            "denoising_strength": 0.5})
    assert r.status_code == 200, r.text
    image = decode(r.json()["images"][0])
    assert image.size == (128, 128)
    text = parse_infotext(image.info["parameters"])
    assert text["Size"] == "64x64"                                    # the first pass's, as the web UI writes it
    assert (text["Hires upscale"], text["Hires steps"], text["Hires upscaler"]) == ("2.0", "2", "Latent")
    assert text["Denoising strength"] == "0.5"
    info = json.loads(r.json()["info"])
    assert info["denoising_strength"] == 0.5 and info["extra_generation_params"]["Hires upscaler"] == "Latent"
    assert r.json()["parameters"]["enable_hr"] is True


def test_hr_resize_pixel_upscalers_and_the_second_pass_settings(sd):
    r = sd.post("txt2img", {**SMALL, "enable_hr": True, "hr_resize_x": 128, "hr_resize_y": 96,
                            "hr_upscaler": "Lanczos", "hr_sampler_name": "Euler a", "hr_prompt": "a tall lighthouse"})
    assert r.status_code == 200, r.text
    image = decode(r.json()["images"][0])
    assert image.size == (128, 96)                                    # covered at 128x128, centre kept
    text = parse_infotext(image.info["parameters"])
    assert text["Hires resize"] == "128x96" and text["Hires upscaler"] == "Lanczos"
    assert text["Hires sampler"] == "Euler a" and text["Hires prompt"] == "a tall lighthouse"
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.75   # the web UI's default
    one_side = sd.post("txt2img", {**SMALL, "width": 64, "height": 96, "enable_hr": True, "hr_resize_x": 96,
                                   "hr_upscaler": "Nearest"})
    assert decode(one_side.json()["images"][0]).size == (96, 144)


def test_hr_scheduler_alone_keeps_the_first_pass_sampler(sd):
    r = sd.post("txt2img", {**SMALL, "sampler_index": "DPM++ 2M", "enable_hr": True, "hr_scale": 1.5,
                            "hr_scheduler": "Karras", "hr_sampler_name": "Use same sampler"})
    assert r.status_code == 200, r.text
    text = parse_infotext(decode(r.json()["images"][0]).info["parameters"])
    assert text["Hires schedule type"] == "Karras" and "Hires sampler" not in text
    assert decode(r.json()["images"][0]).size == (96, 96)


def test_hires_refusals_name_the_field(sd):
    r = sd.post("txt2img", {**SMALL, "enable_hr": True, "hr_upscaler": "4x-UltraSharp"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "hr_upscaler"], r.text
    r = sd.post("txt2img", {**SMALL, "enable_hr": True, "hr_scale": 64})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "hr_scale"], r.text
    r = sd.post("txt2img", {**SMALL, "enable_hr": True, "hr_resize_x": 8192})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "hr_resize_x"], r.text
    r = sd.post("txt2img", {**SMALL, "enable_hr": True, "hr_sampler_name": "DDIM",
                            "override_settings": {"sd_model_checkpoint": "sdq-tiny-flux"}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "hr_sampler_name"], r.text
    r = sd.post("txt2img", {**SMALL, "enable_hr": True, "hr_checkpoint_name": "another"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "hr_checkpoint_name"], r.text


def test_sdxl_hires_works(sd):
    r = sd.post("txt2img", {**SMALL, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent (bicubic antialiased)",
                            "override_settings": {"sd_model_checkpoint": "sdq-tiny-xl"}})
    assert r.status_code == 200, r.text
    image = decode(r.json()["images"][0])
    assert image.size == (96, 96)
    assert parse_infotext(image.info["parameters"])["Model"] == "sdq-tiny-xl"


def test_upscaler_lists(sd):
    names = [u["name"] for u in sd.get("upscalers").json()]
    assert names == ["None", "Lanczos", "Nearest", "sdq-tiny-esrgan-x4", "sdq-tiny-esrgan-x4-old"]   # then models
    assert set(sd.get("upscalers").json()[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    modes = [m["name"] for m in sd.get("latent-upscale-modes").json()]
    assert modes == ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                     "Latent (nearest)", "Latent (nearest-exact)"]


def test_extra_single_image_upscales_to_the_requested_size(sd):
    r = sd.post("extra-single-image", {"image": png(40, 32), "upscaling_resize": 2, "upscaler_1": "Lanczos"})
    assert r.status_code == 200, r.text
    assert decode(r.json()["image"]).size == (80, 64)
    assert "Postprocess upscale by: 2" in r.json()["html_info"] and "Postprocess upscaler: Lanczos" in \
        r.json()["html_info"]
    r = sd.post("extra-single-image", {"image": png(40, 32), "resize_mode": 1, "upscaling_resize_w": 100,
                                       "upscaling_resize_h": 50, "upscaler_1": "Nearest", "upscaler_2": "Lanczos",
                                       "extras_upscaler_2_visibility": 0.5})
    assert r.status_code == 200, r.text
    assert decode(r.json()["image"]).size == (100, 50)
    unchanged = sd.post("extra-single-image", {"image": png(40, 32)})     # upscaler_1 "None": no upscale
    assert decode(unchanged.json()["image"]).size == (40, 32)


def test_extras_refuse_what_they_would_not_run(sd):
    r = sd.post("extra-single-image", {"image": png(40, 32), "upscaler_1": "Lanczos", "gfpgan_visibility": 0.5})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "gfpgan_visibility"], r.text
    r = sd.post("extra-single-image", {"image": png(40, 32), "upscaler_1": "R-ESRGAN 4x+"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "upscaler_1"], r.text
    r = sd.post("extra-single-image", {"image": png(40, 32), "upscaler_1": "Lanczos", "upscaling_resize": 8,
                                       "resize_mode": 1, "upscaling_resize_w": 4096, "upscaling_resize_h": 64})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "upscaling_resize_w"], r.text


def test_extra_batch_images(sd):
    r = sd.post("extra-batch-images", {"imageList": [{"data": png(40, 32), "name": "a.png"},
                                                     {"data": png(16, 16, "red"), "name": "b.png"}],
                                       "upscaling_resize": 2, "upscaler_1": "Nearest"})
    assert r.status_code == 200, r.text
    assert [decode(image).size for image in r.json()["images"]] == [(80, 64), (32, 32)]


def test_both_hires_passes_read_the_prompt_syntax(sd):
    """Emphasis reaches the first and the second pass (and `(word:1.0)` is plain `word` in both)."""
    def pixels(prompt: str, upscaler: str) -> bytes:
        r = sd.post("txt2img", {**SMALL, "prompt": prompt, "enable_hr": True, "hr_scale": 1.5,
                                "hr_second_pass_steps": 2, "hr_upscaler": upscaler})
        assert r.status_code == 200, r.text
        return decode(r.json()["images"][0]).tobytes()

    for upscaler in ("Latent", "Lanczos"):
        plain = pixels("a red lighthouse", upscaler)
        assert pixels("a (red:1.0) lighthouse", upscaler) == plain
        assert pixels("a (red:1.8) lighthouse", upscaler) != plain
    first_only = sd.post("txt2img", {**SMALL, "prompt": "a red lighthouse", "enable_hr": True, "hr_scale": 1.5,
                                     "hr_second_pass_steps": 2, "hr_prompt": "a (red:1.8) lighthouse"})
    assert decode(first_only.json()["images"][0]).tobytes() != pixels("a red lighthouse", "Latent")
