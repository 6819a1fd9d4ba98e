"""LoRA training (worker/training.py) on the tiny SD 1.x and SDXL models, on the CPU; no stack needed."""
from __future__ import annotations

import math

import pytest
from PIL import Image

from common.catalog import find_model
from dev.tinymodel import build_tiny_model, build_tiny_xl
from worker.training import (Example, TrainingConfig, bucket_size, caption_with_trigger, resize_and_crop,
                             training_precision,
                             save_lora_file, state_from_bytes, state_to_bytes, train_lora)


class Cancelled(Exception):
    pass


def gradient(width: int, height: int, tint: int) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata([((x * 255) // width, (y * 255) // height, tint) for y in range(height) for x in range(width)])
    return image


EXAMPLES = [Example(gradient(64, 64, 0), "a red square"), Example(gradient(96, 64, 128), "a wide field"),
            Example(gradient(64, 80, 255), "")]


def load(models_dir, name, build):
    from worker.pipelines import family_for

    build(models_dir / name)
    model = find_model(models_dir, name)
    return family_for(model).load(model, "cpu", None, "float32")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return load(tmp_path_factory.mktemp("models"), "sdq-tiny", build_tiny_model)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return load(tmp_path_factory.mktemp("models"), "sdq-tiny-xl", build_tiny_xl)


def config(**kw) -> TrainingConfig:
    return TrainingConfig(**{"max_steps": 3, "resolution": 64, "seed": 5, "learning_rate": 1e-2, **kw})


def snapshot(unet):
    return {k: (v.data_ptr(), v.detach().clone(), v.requires_grad) for k, v in unet.named_parameters()}


def generate(pipe, **kw):
    import torch

    return pipe(prompt="a red square", width=64, height=64, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(3), **kw).images[0]


def test_buckets_are_multiples_of_64_near_the_aspect_ratio():
    assert bucket_size(512, 512, 512) == (512, 512)
    width, height = bucket_size(1600, 900, 512)
    assert width % 64 == 0 and height % 64 == 0 and width > height and abs(width * height / 512 ** 2 - 1) < 0.15
    assert bucket_size(100, 3000, 64) == (64, 64)          # the tiny model's only bucket
    image, (top, left) = resize_and_crop(gradient(96, 64, 0), 64, 64)
    assert image.size == (64, 64) and (top, left) == (0, 16)
    assert caption_with_trigger(" a cat ", "sks") == "sks, a cat" and caption_with_trigger("", "sks") == "sks"
    assert caption_with_trigger("a cat", "") == "a cat"


def test_training_reports_a_finite_loss_each_step_and_leaves_the_pipeline_untouched(sd, tmp_path):
    import numpy as np

    before = snapshot(sd.unet)
    plain = generate(sd)
    steps = []
    result = train_lora(sd, EXAMPLES, config(trigger_word="sks"), on_step=lambda *a: steps.append(a))
    assert [(s, t) for s, t, _ in steps] == [(1, 3), (2, 3), (3, 3)]
    assert all(math.isfinite(loss) for _, _, loss in steps) and result.losses == [loss for *_, loss in steps]
    assert result.state_dict and all(k.startswith("unet.") for k in result.state_dict)

    after = snapshot(sd.unet)
    assert after.keys() == before.keys()                  # no LoRA layers left on the warm UNet
    for name, (ptr, value, grad) in before.items():
        assert after[name][0] == ptr and after[name][2] == grad and after[name][1].equal(value), name
    assert np.array_equal(generate(sd), plain)

    path = save_lora_file(result, tmp_path / "trained.safetensors")
    sd.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="trained")
    try:
        with_lora = generate(sd)
    finally:
        sd.unload_lora_weights()
    assert np.abs(with_lora - plain).max() > 1e-4
    assert np.array_equal(generate(sd), plain)


def test_resumed_run_ends_with_the_same_weights(sd):
    import torch

    settings = config(max_steps=6, checkpoint_every=3, batch_size=2, gradient_accumulation=2,
                      lr_scheduler="cosine", lr_warmup_steps=2, noise_offset=0.05)
    straight = train_lora(sd, EXAMPLES, settings)

    saved, reported = [], []

    def stop_at_3(step, total, loss):
        reported.append(step)
        if step == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        train_lora(sd, EXAMPLES, settings, on_step=stop_at_3, save_state=lambda s: saved.append(state_to_bytes(s)))
    assert reported == [1, 2, 3] and len(saved) == 1
    state = state_from_bytes(saved[0])
    assert state.step == 3 and len(state.losses) == 3
    resumed = train_lora(sd, EXAMPLES, settings, on_step=lambda step, *_: reported.append(step), resume=state)
    assert reported == [1, 2, 3, 4, 5, 6] and resumed.steps == 6
    assert resumed.losses == pytest.approx(straight.losses)
    assert resumed.state_dict.keys() == straight.state_dict.keys()
    for key, value in straight.state_dict.items():
        assert torch.allclose(resumed.state_dict[key], value), key


def test_state_bytes_refuse_other_payloads():
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"format": 999}, buffer)
    with pytest.raises(ValueError):
        state_from_bytes(buffer.getvalue())


def test_sdxl_trains_and_its_lora_loads(xl, tmp_path):
    import numpy as np

    before = snapshot(xl.unet)
    steps = []
    result = train_lora(xl, EXAMPLES, config(max_steps=2, alpha=8), on_step=lambda *a: steps.append(a))
    assert [s for s, *_ in steps] == [1, 2] and all(math.isfinite(loss) for *_, loss in steps)
    assert all(after[1].equal(before[k][1]) for k, after in snapshot(xl.unet).items())
    path = save_lora_file(result, tmp_path / "xl.safetensors")
    plain = generate(xl)
    xl.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="trained")
    try:
        assert np.abs(generate(xl) - plain).max() > 1e-4
    finally:
        xl.unload_lora_weights()


def test_bf16_after_full_precision_in_the_same_process(sd):
    # accelerate keeps one process-wide state; a worker's next job may ask for another precision
    result = train_lora(sd, EXAMPLES[:1], config(max_steps=1, mixed_precision="bf16"))
    assert result.steps == 1 and math.isfinite(result.losses[0])


def test_config_refuses_what_cannot_train(sd):
    with pytest.raises(ValueError, match="multiple of 64"):
        config(resolution=100)
    with pytest.raises(ValueError, match="mixed_precision"):
        config(mixed_precision="fp8")
    with pytest.raises(ValueError, match="no training examples"):
        train_lora(sd, [], config())
    assert config(rank=8).alpha == 8.0


def test_half_precision_weights_on_cuda_always_train_under_autocast():
    """A GPU guard checked on the CPU: fp16 warm weights make fp16 gradients, which need the GradScaler that
    mixed precision "fp16" brings, whatever the request said; the CPU's fp32 weights take the request."""
    import torch

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert training_precision("no", torch.float16, cuda) == "fp16"
    assert training_precision("bf16", torch.float16, cuda) == "bf16"
    assert training_precision("no", torch.bfloat16, cuda) == "bf16"
    assert training_precision("no", torch.float32, cuda) == "no"
    assert training_precision("no", torch.float32, cpu) == "no" and training_precision("bf16", torch.bfloat16, cpu) == "bf16"


def test_gradient_checkpointing_trains_the_same_lora(sd):
    """Recomputing activations in the backward changes memory, not the result."""
    import torch

    plain = train_lora(sd, EXAMPLES, config(max_steps=2))
    checkpointed = train_lora(sd, EXAMPLES, config(max_steps=2, gradient_checkpointing=True))
    assert checkpointed.losses == pytest.approx(plain.losses)
    for key, value in plain.state_dict.items():
        assert torch.allclose(checkpointed.state_dict[key], value, atol=1e-6), key


def test_an_image_shrunk_on_load_trains_as_the_full_size_one():
    """Loaders shrink each image to its bucket at once (memory): the sample, its size conditioning included,
    is the one the full-size image makes."""
    import torch

    from worker.training import prepare_samples, shrink_to_bucket

    big = gradient(1000, 700, 40)
    settings = config(resolution=128)
    small = shrink_to_bucket(big, 128)
    assert small.width * small.height < big.width * big.height / 20
    (full,) = prepare_samples([Example(big, "x")], settings)
    (shrunk,) = prepare_samples([Example(small, "x", (big.height, big.width))], settings)
    assert shrunk.size == full.size and shrunk.crop_top_left == full.crop_top_left
    assert shrunk.original_size == full.original_size == (700, 1000)
    assert torch.allclose(shrunk.pixels, full.pixels, atol=0.05)


def test_a_checkpoint_keeps_the_loss_scale_of_fp16_training():
    """On CUDA fp16 training runs a GradScaler: a resumed run must start from its scale, not find it again by
    skipping steps; the checkpoint's bytes carry it (and still load with weights_only)."""
    import torch

    from worker.training import TrainingState

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(1))                 # the scale exists once a loss was scaled
    scaler.update(new_scale=256.0)
    state = TrainingState(step=3, lora_state_dict={}, optimizer_state={}, scheduler_state={}, rng_states={},
                          losses=[1.0, 0.5, 0.25], scaler_state=scaler.state_dict())
    again = torch.amp.GradScaler("cpu")
    again.load_state_dict(state_from_bytes(state_to_bytes(state)).scaler_state)
    assert again.get_scale() == 256.0


def test_a_diverged_loss_fails_the_job_with_a_clear_message():
    """NaN or infinite losses mean the run diverged: the job fails saying so (and no NaN reaches the JSON)."""
    from types import SimpleNamespace

    from common.errors import ModelError
    from worker.trainingjob import TrainingProgress

    monitor = SimpleNamespace(flags=SimpleNamespace(setup=False, loss=None, loss_curve=None), steps=0,
                              on_step=lambda step, total: None)
    progress = TrainingProgress(monitor, 10, [])
    progress(1, 5, 0.5)
    assert monitor.flags.loss == 0.5 and monitor.flags.loss_curve == [[1, 0.5]]
    with pytest.raises(ModelError, match="diverged"):
        progress(2, 5, float("nan"))
    assert monitor.flags.loss == 0.5
