"""GPU speed-ups (worker/speedups.py) on the CPU: they change how modules run, never what a job makes.

channels_last, fused QKV and the classic attention run on the CPU too, so
their effect on images and on LoRA jobs is checked here; TF32 and
torch.compile need CUDA to mean anything and are exercised by bench/gpu.py.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from common.catalog import find_model, list_loras
from common.jobspec import JobSpec, LoraRef

SPEC = dict(prompt="a red fox", model="sdq-tiny", width=64, height=64, num_inference_steps=3, guidance_scale=7.5,
            seed=5)


def load(settings, speedups):
    from worker.registry import load_pipeline

    return load_pipeline(find_model(settings.models_dir, "sdq-tiny"), "cpu", None, "float32", speedups)


def run(pipe, settings, **changes) -> np.ndarray:
    from worker.generation import generate

    result = generate(pipe, JobSpec(**{**SPEC, **changes}), None, list_loras(settings.lora_dir), lambda *a: a[-1])
    return np.asarray(result.images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def plain(settings):
    from worker.speedups import Speedups

    return load(settings, Speedups())


@pytest.fixture(scope="module")
def tuned(settings):
    from worker.speedups import Speedups

    return load(settings, Speedups(sdpa=False, channels_last=True, fuse_qkv=True))


def test_speedups_give_the_same_images(settings, plain, tuned):
    assert np.abs(run(tuned, settings) - run(plain, settings)).max() <= 3


def test_a_lora_job_on_fused_attention_applies_its_lora_and_leaves_the_fusion(settings, plain, tuned):
    import torch

    fused = {type(p).__name__ for p in tuned.unet.attn_processors.values()}
    assert any("Fused" in name for name in fused)
    before = {n: t.data_ptr() for n, t in tuned.unet.state_dict().items()}
    lora = dict(loras=[LoraRef("tiny_style", 1.0)])
    styled = run(tuned, settings, **lora)
    assert np.abs(styled - run(plain, settings, **lora)).max() <= 3      # the LoRA acted, as without fusion
    assert np.abs(styled - run(tuned, settings)).max() > 3               # and it did change the image
    assert {type(p).__name__ for p in tuned.unet.attn_processors.values()} == fused
    assert {n: t.data_ptr() for n, t in tuned.unet.state_dict().items()} == before
    assert tuned.unet.dtype == torch.float32


def test_cuda_only_speedups_stay_off_on_the_cpu():
    from worker.speedups import Speedups

    worker = SimpleNamespace(sdpa=True, channels_last=True, fuse_qkv=False, tf32=True, compile=False)
    settings = SimpleNamespace(worker=worker)
    assert Speedups.for_device(settings, "cpu").names() == ["sdpa"]
    assert Speedups.for_device(settings, "cuda:0").names() == ["sdpa", "channels_last", "tf32"]


def test_health_reports_speedups_and_compilation(api):
    gpu = [w for w in api.get("/health").json()["workers"] if w["models"]]
    assert gpu and all(w["speedups"] == ["sdpa"] and w["compiled"] is False for w in gpu)
