"""Precision and weight sharing: no job converts or copies the shared warm weights.

Why bfloat16 on the CPU: a GPU worker holds fp16 weights, and a silent
conversion (diffusers' from_pipe turned a shared fp16 pipeline into fp32)
is invisible to fp32 tests. The CPU runs bfloat16, so loading the tiny
model in it and checking every parameter's dtype and storage after a job of
every mode, with and without LoRAs, guards what a GPU needs.
"""
from __future__ import annotations

import pytest
from PIL import Image

from common.catalog import find_model, list_loras
from common.jobspec import JobSpec, LoraRef

SPEC = dict(prompt="a red fox", model="sdq-tiny", width=64, height=64, num_inference_steps=3, guidance_scale=7.5,
            seed=3)
HIRES = {"upscale_width": 128, "upscale_height": 128, "width": 128, "height": 96, "steps": 2, "strength": 0.6}


def output_size(spec: JobSpec) -> tuple[int, int]:
    return (spec.hires["width"], spec.hires["height"]) if spec.hires else (spec.width, spec.height)
JOBS = {
    "txt2img": JobSpec(**SPEC),
    "img2img": JobSpec(**SPEC, init_image_key="in/init.png", strength=0.7),
    "inpaint": JobSpec(**SPEC, init_image_key="in/init.png", mask_image_key="in/mask.png", strength=0.7),
    "txt2img with a LoRA": JobSpec(**SPEC, loras=[LoraRef("tiny_style", 0.8)]),
    "hires fix, latent upscaler": JobSpec(**SPEC, hires={**HIRES, "upscaler": "Latent (bicubic antialiased)"}),
    "hires fix, pixel upscaler, another second-pass scheduler": JobSpec(**SPEC, hires={
        **HIRES, "upscaler": "Lanczos", "scheduler": "EulerAncestralDiscreteScheduler"}),
    "img2img with a LoRA, another scheduler": JobSpec(**SPEC, init_image_key="in/init.png", strength=0.6,
                                                      scheduler="EulerAncestralDiscreteScheduler",
                                                      loras=[LoraRef("tiny_style", 1.0)]),
}


def weights(pipe) -> dict[tuple[str, str], tuple]:
    """Every tensor of every module of the pipeline: its dtype and where its storage lives."""
    import torch

    return {(name, tensor_name): (tensor.dtype, tensor.data_ptr())
            for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
            for tensor_name, tensor in module.state_dict().items()}


@pytest.fixture(scope="module")
def bf16_pipeline(settings):
    from worker.registry import load_pipeline

    return load_pipeline(find_model(settings.models_dir, "sdq-tiny"), "cpu", None, "bfloat16")


def no_step(pipe, step, timestep, tensors):
    return {}


@pytest.mark.parametrize("job", list(JOBS))
def test_a_job_leaves_the_shared_weights_as_they_were(bf16_pipeline, settings, job):
    import torch

    from worker.generation import generate

    before = weights(bf16_pipeline)
    assert {dtype for dtype, _ in before.values()} == {torch.bfloat16}
    image, mask = Image.new("RGB", (64, 64), "orange"), Image.new("L", (64, 64), 255)
    result = generate(bf16_pipeline, JOBS[job], image, list_loras(settings.lora_dir), no_step, mask)
    assert len(result.images) == 1 and result.images[0].size == output_size(JOBS[job])
    assert weights(bf16_pipeline) == before          # same dtype, same storage: nothing converted or copied
    assert bf16_pipeline.dtype == torch.bfloat16


def test_worker_dtype_auto_is_the_family_choice_on_cuda_and_float32_on_cpu():
    from worker.pipelines import sd
    from worker.pipelines.base import resolve_dtype

    assert resolve_dtype("auto", sd.FAMILY, "cuda:0") == "float16"
    assert resolve_dtype("auto", sd.FAMILY, "cpu") == "float32"
    assert resolve_dtype("bfloat16", sd.FAMILY, "cuda") == "bfloat16"
    with pytest.raises(ValueError, match="worker.dtype"):
        resolve_dtype("fp8", sd.FAMILY, "cuda")


def test_health_reports_each_worker_s_precision(api):
    workers = api.get("/health").json()["workers"]
    gpu = [w for w in workers if w["models"]]
    assert gpu and all(w["dtype"] == "float32" for w in gpu)          # the test stack's CPU worker


FAMILY_JOBS = {   # model -> its jobs (sizes its family accepts; a LoRA where the test stack has one)
    "sdq-tiny-xl": [dict(), dict(init_image_key="in/init.png", strength=0.7),
                    dict(loras=[LoraRef("tiny_xl_style", 0.8)]), dict(hires={**HIRES, "upscaler": "Latent"}),
                    dict(hires={**HIRES, "upscaler": "Nearest"})],
    "sdq-tiny-sd3": [dict(), dict(init_image_key="in/init.png", strength=0.7),
                     dict(scheduler="FlowMatchHeunDiscreteScheduler"), dict(hires={**HIRES, "upscaler": "Latent"})],
    "sdq-tiny-flux": [dict(), dict(init_image_key="in/init.png", strength=0.7),
                      dict(scheduler_config={"use_karras_sigmas": True}), dict(hires={**HIRES, "upscaler": "Latent"})],
}


@pytest.mark.parametrize("model", list(FAMILY_JOBS))
def test_every_family_keeps_its_shared_weights_in_bfloat16(settings, model):
    """SDXL, SD3 and Flux too: loaded in bf16, their jobs convert or copy nothing."""
    import torch

    from worker.generation import generate
    from worker.registry import load_pipeline

    pipe = load_pipeline(find_model(settings.models_dir, model), "cpu", None, "bfloat16")
    before = weights(pipe)
    assert {dtype for dtype, _ in before.values()} == {torch.bfloat16}
    for extra in FAMILY_JOBS[model]:
        spec = JobSpec(**{**SPEC, "model": model, "num_inference_steps": 2, **extra})
        result = generate(pipe, spec, Image.new("RGB", (64, 64), "orange"), list_loras(settings.lora_dir), no_step)
        assert result.images[0].size == output_size(spec), extra
        assert weights(pipe) == before, extra


def test_auto_precision_is_bfloat16_for_sd3_and_flux_on_cuda():
    from worker.pipelines import flux, sd3, sdxl
    from worker.pipelines.base import resolve_dtype

    assert resolve_dtype("auto", sdxl.FAMILY, "cuda") == "float16"
    assert resolve_dtype("auto", sd3.FAMILY, "cuda") == "bfloat16"
    assert resolve_dtype("auto", flux.FAMILY, "cuda:1") == "bfloat16"
