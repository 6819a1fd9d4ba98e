"""SDXL single files: tests/single_file.py writes an SDXL (and SDXL refiner) folder
as one original-layout checkpoint that diffusers loads offline, with the folder as
config, into the same weights and the same pixels.

The tiny SDXL here follows diffusers' own tests (tests/pipelines/stable_diffusion_xl,
get_dummy_components) with two changes that matter to the single-file loader:
- text_encoder_2 is WIDER than text_encoder (64 vs 32). diffusers tells the two
  CLIPs of one file apart by width: CLIPTextModelWithProjection would take
  `conditioner.embedders.0.transformer.` (the ViT-L keys) whenever their
  position_embedding has its width (create_diffusers_clip_model_from_ldm).
- text_encoder_2 has 10 layers, so the file holds diffusers' SDXL marker
  `conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias`
  (refiner: `conditioner.embedders.0.model.transformer.resblocks.9...`) and
  infer_diffusers_model_type says xl_base / xl_refiner. With `config=<folder>`
  the inferred type is never consulted (shown below), so it only matters to
  loading without config, which needs the hub anyway.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.single_file import write_single_file_checkpoint

LOAD = dict(local_files_only=True)
PROMPT = "a red fox in snow"


def build_tiny_sdxl(out_dir: Path, refiner: bool = False, seed: int = 0, open_clip_width: int = 64,
                    open_clip_layers: int = 10) -> Path:
    """Save a tiny StableDiffusionXLPipeline (refiner: StableDiffusionXLImg2ImgPipeline
    without text_encoder, as stabilityai's refiner) folder at out_dir. text_encoder is
    32 wide; text_encoder_2 open_clip_width wide with open_clip_layers layers."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from dev.tinymodel import write_tokenizer_files

    out_dir = Path(out_dir)
    tok_dir = out_dir.with_name(out_dir.name + "-tok")
    write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                              model_max_length=77, pad_token="<|endoftext|>")

    def clip_config(width: int, layers: int) -> CLIPTextConfig:
        return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, hidden_size=width, intermediate_size=37,
                              num_attention_heads=4, num_hidden_layers=layers, vocab_size=len(tokenizer),
                              max_position_embeddings=77, projection_dim=32, layer_norm_eps=1e-5, hidden_act="gelu")

    torch.manual_seed(seed)
    time_dim, pooled = 8, 32
    # text_time embeds [pooled text_encoder_2 output, time ids]: 6 ids (base), 5 (refiner: aesthetic score).
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=(5 if refiner else 6) * time_dim + pooled,
        cross_attention_dim=open_clip_width if refiner else 32 + open_clip_width, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(16, 32, 32, 32), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, layers_per_block=1, norm_num_groups=16, sample_size=128)
    text_encoder = None if refiner else CLIPTextModel(clip_config(32, 2))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(open_clip_width, open_clip_layers))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                 tokenizer=None if refiner else tokenizer, tokenizer_2=tokenizer, scheduler=scheduler)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True,
                                                force_zeros_for_empty_prompt=False)
    else:
        pipe = StableDiffusionXLPipeline(**parts)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="module")
def quiet():
    from diffusers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: tiny models gain nothing from two, and two threads on two
    busy cores made a 2-step call 30x slower (0.1 s -> 3 s, measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def xl(tmp_path_factory, quiet) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("xl")
    folder = build_tiny_sdxl(root / "tiny-xl")
    single = root / "tiny-xl.safetensors"
    write_single_file_checkpoint(folder, single)
    return folder, single


@pytest.fixture(scope="module")
def refiner(tmp_path_factory, quiet) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("xl-refiner")
    folder = build_tiny_sdxl(root / "tiny-refiner", refiner=True)
    single = root / "tiny-refiner.safetensors"
    write_single_file_checkpoint(folder, single)
    return folder, single


@pytest.fixture
def no_type_inference(monkeypatch):
    """Make diffusers' checkpoint-type guess fail loudly: whatever loads with this
    in place did not depend on it."""
    from diffusers.loaders import single_file_utils

    def refuse(checkpoint):
        raise AssertionError("infer_diffusers_model_type was consulted")

    monkeypatch.setattr(single_file_utils, "infer_diffusers_model_type", refuse)


def same_weights(original, loaded, names):
    import torch

    for name in names:
        want, got = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        assert [k for k in want if not torch.equal(want[k], got[k])] == [], name


def txt2img(pipe):
    import torch

    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, width=64, height=64, num_inference_steps=2, generator=torch.Generator().manual_seed(1),
                output_type="np").images[0]


def test_sdxl_file_has_the_original_layout(xl):
    from safetensors import safe_open

    folder, single = xl
    with safe_open(str(single), "pt") as f:
        keys = set(f.keys())
        projection = f.get_slice("conditioner.embedders.1.model.text_projection").get_shape()
        in_proj = f.get_slice("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight").get_shape()
    assert {"model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
            "model.diffusion_model.output_blocks.2.2.conv.weight",   # upsampler after the attention
            "model.diffusion_model.middle_block.1.transformer_blocks.1.ff.net.2.weight",
            "first_stage_model.decoder.up.3.upsample.conv.weight",
            "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
            "conditioner.embedders.1.model.positional_embedding",
            "conditioner.embedders.1.model.token_embedding.weight", "conditioner.embedders.1.model.ln_final.bias",
            "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",   # diffusers' xl_base marker
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias"} <= keys
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                "conditioner.embedders.1.model.")
    assert all(k.startswith(prefixes) for k in keys)
    assert not any(part in k for k in keys for part in (".down_blocks.", ".up_blocks.", ".resnets.", "add_embedding",
                                                         "position_ids"))
    open_clip = [k for k in keys if k.startswith("conditioner.embedders.1.")]
    assert not any(part in k for k in open_clip for part in ("q_proj", "self_attn", "encoder.layers", "layer_norm"))
    assert projection == [64, 32] and in_proj == [3 * 64, 64]     # (width, projection_dim): Linear weight transposed
    te2 = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    assert (te2["hidden_size"], te2["projection_dim"]) == (64, 32)


def test_sdxl_file_is_detected_as_xl_base_by_diffusers(xl):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import load_file

    assert infer_diffusers_model_type(load_file(str(xl[1]))) == "xl_base"


def test_sdxl_round_trip_is_exact(xl, no_type_inference):
    import numpy as np
    from diffusers import StableDiffusionXLPipeline

    folder, single = xl
    with pytest.raises(AssertionError, match="consulted"):      # without config= diffusers guesses the type
        StableDiffusionXLPipeline.from_single_file(str(single), **LOAD)
    original = StableDiffusionXLPipeline.from_pretrained(str(folder), **LOAD)
    loaded = StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder), **LOAD)
    assert type(loaded.scheduler) is type(original.scheduler)
    same_weights(original, loaded, ("unet", "vae", "text_encoder", "text_encoder_2"))
    assert np.array_equal(txt2img(loaded), txt2img(original))


def test_sd1_class_cannot_load_an_sdxl_file(xl, tmp_path):
    """The family must pick the pipeline class: the SD 1.x class with an SD 1.x folder
    as config fails inside the UNet; with the SDXL folder as config it loads the SDXL
    UNet but has no pooled text embeds / time ids to give it."""
    from diffusers import StableDiffusionPipeline

    from dev.tinymodel import build_tiny_model

    folder, single = xl
    sd1 = build_tiny_model(tmp_path / "sd1")
    with pytest.raises(ValueError, match=r"mid_block\.attentions\.0\.proj_in\.weight expected shape"):
        StableDiffusionPipeline.from_single_file(str(single), config=str(sd1), **LOAD)

    wrong_class = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), **LOAD)
    assert wrong_class.unet.config.addition_embed_type == "text_time"
    with pytest.raises((TypeError, ValueError)):      # 0.42.1: TypeError, added_cond_kwargs is None
        txt2img(wrong_class)


def test_refiner_round_trip_is_exact(refiner, no_type_inference):
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline

    folder, single = refiner
    original = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(folder), **LOAD)
    loaded = StableDiffusionXLImg2ImgPipeline.from_single_file(str(single), config=str(folder), **LOAD)
    assert loaded.text_encoder is None and loaded.tokenizer is None
    same_weights(original, loaded, ("unet", "vae", "text_encoder_2"))
    image = torch.linspace(0, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)

    def img2img(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPT, image=image, strength=0.5, num_inference_steps=4,
                    generator=torch.Generator().manual_seed(1), output_type="np").images[0]

    assert np.array_equal(img2img(loaded), img2img(original))


def test_refiner_file_has_only_the_open_clip_encoder(refiner):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import load_file

    state = load_file(str(refiner[1]))
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.model."))
               for k in state)
    assert "conditioner.embedders.0.model.text_projection" in state          # diffusers' open_clip_sdxl_refiner
    assert infer_diffusers_model_type(state) == "xl_refiner"
