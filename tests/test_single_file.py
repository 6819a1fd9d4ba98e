"""Single-file checkpoints: an original-layout .safetensors (as civitai serves
them) loads offline with the default model's folder as config and generates
the same pixels as the diffusers folder it was converted from."""
from __future__ import annotations

import time

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.infotext import parse_infotext
from tests.helpers import fetch, pixels, read_parameters

SINGLE = "tiny-single.safetensors"
LOAD = dict(local_files_only=True, safety_checker=None, requires_safety_checker=False)


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def generate(pipe):
    import torch

    return pipe("a red fox in snow", width=64, height=64, num_inference_steps=4,
                generator=torch.Generator().manual_seed(1), output_type="np").images[0]


def test_checkpoint_has_the_original_layout(settings):
    keys = set(safe_open(str(settings.models_dir / SINGLE), "pt").keys())
    assert {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
            "model.diffusion_model.output_blocks.1.2.conv.weight",
            "first_stage_model.encoder.down.0.block.0.norm1.weight",
            "first_stage_model.decoder.up.3.upsample.conv.weight",
            "first_stage_model.encoder.mid.attn_1.q.weight",
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"} <= keys
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    assert not any(".down_blocks." in k or ".up_blocks." in k or ".resnets." in k for k in keys)


def test_round_trip_is_exact_and_weights_come_from_the_file(settings, tmp_path, one_thread):
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    folder, single = settings.models_dir / "sdq-tiny", settings.models_dir / SINGLE
    original = StableDiffusionPipeline.from_pretrained(str(folder), **LOAD)
    loaded = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), **LOAD)
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        assert [k for k in want if not torch.equal(want[k], got[k])] == [], name
    expected = generate(original)
    assert np.array_equal(generate(loaded), expected)

    # Control: change one weight in the file only; the folder used as config is untouched.
    state = load_file(str(single))
    state["model.diffusion_model.out.2.weight"] = state["model.diffusion_model.out.2.weight"] * 2
    altered = tmp_path / "altered.safetensors"
    save_file(state, str(altered))
    other = StableDiffusionPipeline.from_single_file(str(altered), config=str(folder), **LOAD)
    assert not np.array_equal(generate(other), expected)


def test_single_file_model_serves_through_the_api(api):
    single = api.run(model=SINGLE, width=64, height=64, seed=5)
    assert single["status"] == "completed", single
    folder = api.run(model="sdq-tiny", width=64, height=64, seed=5)
    assert folder["status"] == "completed", folder
    data = fetch(single["result_url"])
    assert pixels(data) == pixels(fetch(folder["result_url"]))      # same weights, same seed
    info = parse_infotext(read_parameters(data))
    assert info["Model"] == SINGLE and info["Seed"] == "5" and info["Size"] == "64x64"
    # `loaded` comes from the worker's heartbeat (every second in tests), so it may lag the job a little.
    deadline = time.monotonic() + 15
    while True:
        models = {m["name"]: m for m in api.get("/api/v1/models").json()["models"]}
        if models[SINGLE]["loaded"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert models[SINGLE]["loaded"] is True and models[SINGLE]["type"] == "single_file"
    assert models["sdq-tiny"]["loaded"] is True
