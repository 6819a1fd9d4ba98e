"""The model-family seam (worker/pipelines): lookup, cheap import, and the SD family's views and call arguments."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from common.catalog import find_model
from common.errors import ModelError
from common.jobspec import JobSpec

ROOT = Path(__file__).resolve().parent.parent
SPEC = dict(prompt="a red fox", model="sdq-tiny", width=64, height=48, num_inference_steps=4, guidance_scale=7.5, seed=1)


@pytest.fixture(scope="module")
def tiny(settings):
    from worker.pipelines import family_for

    model = find_model(settings.models_dir, "sdq-tiny")
    return family_for(model).load(model, "cpu", None, "float32")


def test_importing_the_families_loads_no_torch_or_diffusers():
    code = ("import sys, worker.pipelines, worker.pipelines.sd, worker.registry, worker.generation; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sd_family_serves_the_tiny_model_in_both_layouts(settings, tiny):
    from worker.pipelines import family_for, family_of, sd

    for name in ("sdq-tiny", "tiny-single.safetensors"):
        assert family_for(find_model(settings.models_dir, name)) is sd.FAMILY, name
    assert family_of(tiny) is sd.FAMILY
    assert str(tiny.unet.dtype) == "torch.float32"   # fp32 on CPU


def test_every_catalog_family_has_a_worker_family_and_the_same_profile():
    from common.families import PROFILES
    from worker.pipelines import FAMILIES

    served = {name: f for f in FAMILIES for name in f.families}
    assert set(served) == set(PROFILES)
    for name, family in served.items():
        assert family.cuda_dtype() == PROFILES[name].cuda_dtype


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_sd_views_share_the_base_modules_and_keep_its_scheduler(tiny, mode):
    from worker.pipelines.sd import FAMILY

    keys = {"img2img": dict(init_image_key="i"), "inpaint": dict(init_image_key="i", mask_image_key="m")}
    spec = JobSpec(**SPEC, **keys.get(mode, {}))
    own = tiny.scheduler
    scheduler = FAMILY.make_scheduler(tiny, "EulerDiscreteScheduler", {"use_karras_sigmas": True})
    view = FAMILY.make_view(tiny, spec, scheduler)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(view, name) is getattr(tiny, name), name
    assert view.scheduler is scheduler and tiny.scheduler is own
    assert scheduler.config.use_karras_sigmas and type(FAMILY.make_scheduler(tiny, None)) is type(own)


def test_sd_call_kwargs_by_mode():
    from worker.pipelines.sd import FAMILY

    image, mask = Image.new("RGB", (10, 10)), Image.new("L", (10, 10))
    txt = FAMILY.build_call_kwargs(JobSpec(**SPEC, negative_prompt=""), None, None)
    assert txt == dict(prompt="a red fox", negative_prompt=None, num_inference_steps=4, guidance_scale=7.5,
                       width=64, height=48)
    img = FAMILY.build_call_kwargs(JobSpec(**SPEC, init_image_key="i"), image, None)
    assert img["strength"] == 0.75 and img["image"].size == (64, 48) and "width" not in img
    floor = FAMILY.build_call_kwargs(JobSpec(**SPEC, init_image_key="i", strength=0.0), image, None)
    assert floor["strength"] == 0.25   # at least one of the 4 steps runs
    inpaint = FAMILY.build_call_kwargs(JobSpec(**SPEC, init_image_key="i", mask_image_key="m"), image, mask)
    assert inpaint["mask_image"].mode == "L" and (inpaint["width"], inpaint["height"]) == (64, 48)
    with pytest.raises(ModelError, match="^img2img job without its init image$"):
        FAMILY.build_call_kwargs(JobSpec(**SPEC, init_image_key="i"), None, None)
    with pytest.raises(ModelError, match="^inpaint job without its mask$"):
        FAMILY.build_call_kwargs(JobSpec(**SPEC, init_image_key="i", mask_image_key="m"), image, None)
