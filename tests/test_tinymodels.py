"""dev/tinymodel's tiny random-weight families (SD 1.x, SDXL base + refiner, SD3, Flux dev/schnell):
they load through diffusers' own classes, keep each family's native size, generate deterministically,
hand SDXL base latents to the refiner, and take a LoRA. No stack needed."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from dev.tinymodel import TINY_MODEL_NAME, TINY_MODELS, build_tiny_lora, ensure_tiny_models

# name -> (pipeline class from_pretrained gives, native size)
FAMILIES = {
    TINY_MODEL_NAME: ("StableDiffusionPipeline", 128),
    "sdq-tiny-xl": ("StableDiffusionXLPipeline", 1024),
    "sdq-tiny-xl-refiner": ("StableDiffusionXLImg2ImgPipeline", 1024),
    "sdq-tiny-sd3": ("StableDiffusion3Pipeline", 1024),
    "sdq-tiny-flux": ("FluxPipeline", 1024),
    "sdq-tiny-flux-schnell": ("FluxPipeline", 1024),
}
TEXT2IMAGE = [name for name in FAMILIES if name != "sdq-tiny-xl-refiner"]
PROMPT = "a photo of an astronaut riding a horse"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from worker.quiet import quiet_libraries

    quiet_libraries()
    folder = tmp_path_factory.mktemp("models")
    assert [p.name for p in ensure_tiny_models(folder)] == list(TINY_MODELS)
    return folder


def load(models_dir, name: str):
    """The pipeline the AutoPipeline classes pick (the refiner is img2img-only)."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

    auto = AutoPipelineForImage2Image if name.endswith("refiner") else AutoPipelineForText2Image
    pipe = auto.from_pretrained(models_dir / name, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, name: str, seed: int = 0, **kw) -> np.ndarray:
    import torch

    kw = {"num_inference_steps": 2, "output_type": "np", "generator": torch.Generator().manual_seed(seed), **kw}
    if name.endswith("refiner"):
        kw.setdefault("image", torch.linspace(0, 1, 3 * 64 * 64).reshape(1, 3, 64, 64))
        kw.setdefault("strength", 0.6)   # the default 0.3 of 2 steps runs none and returns no image
    return pipe(PROMPT, **kw).images[0]


def test_every_family_is_registered_and_ensure_reuses_built_folders(models_dir):
    assert set(TINY_MODELS) == set(FAMILIES)
    stamps = {n: (models_dir / n / "model_index.json").stat().st_mtime_ns for n in FAMILIES}
    assert ensure_tiny_models(models_dir, ["sdq-tiny-xl"]) == [models_dir / "sdq-tiny-xl"]
    assert stamps == {n: (models_dir / n / "model_index.json").stat().st_mtime_ns for n in FAMILIES}
    assert not [p for p in models_dir.iterdir() if p.name.startswith(".building-")]


def test_a_build_is_deterministic(models_dir, tmp_path):
    def digest(folder):
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*.safetensors"))}

    again = TINY_MODELS["sdq-tiny-sd3"](tmp_path / "sd3")
    assert digest(again) == digest(models_dir / "sdq-tiny-sd3")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_loads_as_its_family_and_generates_deterministically(models_dir, name):
    import diffusers

    expected_class, _ = FAMILIES[name]
    pipe = load(models_dir, name)
    assert type(pipe).__name__ == expected_class
    own = getattr(diffusers, expected_class).from_pretrained(models_dir / name, local_files_only=True)
    assert type(own).__name__ == expected_class
    first, again = generate(pipe, name, height=64, width=64), generate(pipe, name, height=64, width=64)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, generate(pipe, name, seed=1, height=64, width=64))


@pytest.mark.parametrize("name", TEXT2IMAGE)
def test_default_size_is_the_family_native_size(models_dir, name):
    _, native = FAMILIES[name]
    image = generate(load(models_dir, name), name, num_inference_steps=1, guidance_scale=1.0)
    assert image.shape == (native, native, 3)


def test_sdxl_base_latents_hand_over_to_the_refiner(models_dir):
    import torch

    base, refiner = load(models_dir, "sdq-tiny-xl"), load(models_dir, "sdq-tiny-xl-refiner")
    assert refiner.text_encoder is None and refiner.tokenizer is None and refiner.config.requires_aesthetics_score
    assert refiner.vae.config.scaling_factor == base.vae.config.scaling_factor
    latents = base(PROMPT, height=128, width=128, num_inference_steps=4, denoising_end=0.7, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 16, 16)
    image = refiner(PROMPT, image=latents, denoising_start=0.7, num_inference_steps=4, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (128, 128, 3)


def test_t5_tokenizer_reloads_and_fits_the_pipelines_sequence_lengths(models_dir):
    tokenizer = load(models_dir, "sdq-tiny-sd3").tokenizer_3
    ids = tokenizer(PROMPT).input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert len(ids) < 0.6 * len(PROMPT)      # letter pairs and word starts, not one piece per letter
    assert tokenizer.model_max_length >= 512  # Flux's max_sequence_length default (SD3's is 256)
    assert load(models_dir, "sdq-tiny-flux").tokenizer_2.model_max_length >= 512


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_tiny_lora_changes_pixels_and_unloads_cleanly(models_dir, tmp_path, name):
    lora = build_tiny_lora(models_dir / name, tmp_path / "style.safetensors")
    pipe = load(models_dir, name)
    before = generate(pipe, name, height=64, width=64)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
    assert not np.array_equal(before, generate(pipe, name, height=64, width=64))
    pipe.unload_lora_weights()
    assert np.array_equal(before, generate(pipe, name, height=64, width=64))
