"""common.checkpoint_keys: a single file's family from its weight names, read
without torch (safetensors header; torch zip pickle through a stubbing unpickler)."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from common.checkpoint_keys import (family_from_keys, family_of_file, read_checkpoint_keys, read_ckpt_keys,
                                    read_safetensors_keys)

REPO = Path(__file__).resolve().parent.parent
U = "model.diffusion_model."
SD_UNET = [U + "input_blocks.0.0.weight", U + "input_blocks.1.1.proj_in.weight",
           U + "output_blocks.11.0.skip_connection.weight", U + "out.2.weight"]
SD_VAE = ["first_stage_model.encoder.conv_in.weight", "first_stage_model.decoder.up.3.upsample.conv.weight"]
CLIP_L = ["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
          "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"]
OPEN_CLIP_H = ["cond_stage_model.model.token_embedding.weight", "cond_stage_model.model.positional_embedding",
               "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
XL_UNET = SD_UNET + [U + "label_emb.0.0.weight", U + "label_emb.0.2.bias"]
XL_CLIP_L = ["conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"]
XL_OPEN_CLIP = ["conditioner.embedders.1.model.positional_embedding", "conditioner.embedders.1.model.text_projection",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
REFINER_OPEN_CLIP = ["conditioner.embedders.0.model.positional_embedding",
                     "conditioner.embedders.0.model.text_projection"]
MMDIT = ["joint_blocks.0.context_block.adaLN_modulation.1.bias", "joint_blocks.0.x_block.attn.qkv.weight",
         "pos_embed", "x_embedder.proj.weight"]
SD3_TEXT = ["text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight",
            "text_encoders.t5xxl.transformer.shared.weight"]
FLUX_BFL = ["double_blocks.0.img_attn.norm.key_norm.scale", "double_blocks.0.img_attn.qkv.weight",
            "single_blocks.0.linear1.weight", "img_in.weight", "guidance_in.in_layer.bias"]
FLUX_DIFFUSERS = ["x_embedder.weight", "context_embedder.weight", "time_text_embed.timestep_embedder.linear_1.weight",
                  "transformer_blocks.0.attn.norm_added_k.weight", "transformer_blocks.0.attn.to_q.weight",
                  "single_transformer_blocks.0.attn.to_q.weight", "proj_out.weight"]
SD3_DIFFUSERS = ["pos_embed.proj.weight", "pos_embed.pos_embed", "context_embedder.weight",
                 "time_text_embed.text_embedder.linear_1.weight", "transformer_blocks.0.attn.add_k_proj.weight",
                 "transformer_blocks.0.norm1_context.linear.weight", "proj_out.weight"]

CASES = {
    "sd1": ("sd1", SD_UNET + SD_VAE + CLIP_L),
    "sd1 unet only": ("sd1", SD_UNET),
    "sd2": ("sd2", SD_UNET + SD_VAE + OPEN_CLIP_H),
    "sdxl": ("sdxl", XL_UNET + SD_VAE + XL_CLIP_L + XL_OPEN_CLIP),
    "sdxl without clip-l": ("sdxl", XL_UNET + XL_OPEN_CLIP),
    "sdxl unet only": ("sdxl", XL_UNET),
    "sdxl refiner": ("sdxl-refiner", XL_UNET + SD_VAE + REFINER_OPEN_CLIP),
    "sd3 comfy": ("sd3", [U + k for k in MMDIT] + SD_VAE + SD3_TEXT),
    "sd3 bare": ("sd3", MMDIT),
    "sd3 diffusers": ("sd3", SD3_DIFFUSERS),
    "sd3.5 diffusers (qk norm)": ("sd3", SD3_DIFFUSERS + ["transformer_blocks.0.attn.norm_added_k.weight"]),
    "flux bfl": ("flux", FLUX_BFL),
    "flux comfy": ("flux", [U + k for k in FLUX_BFL] + ["vae.decoder.conv_in.weight"]),
    "flux diffusers": ("flux", FLUX_DIFFUSERS),
    # Same double_blocks naming, other pipelines (diffusers tests these before "flux").
    "flux.2": (None, FLUX_BFL + ["single_stream_modulation.lin.weight"]),
    "flux.2 diffusers": (None, FLUX_DIFFUSERS + ["double_stream_modulation_img.linear.weight"]),
    "chroma": (None, [U + k for k in FLUX_BFL] + [U + "distilled_guidance_layer.in_proj.bias"]),
    "chroma diffusers": (None, FLUX_DIFFUSERS + ["distilled_guidance_layer.in_proj.bias"]),
    "hunyuan video": (None, ["double_blocks.0.img_attn_q_norm.weight",
                             "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.bias"]),
    "controlnet": (None, ["control_model.time_embed.0.weight", "control_model.input_blocks.0.0.weight"]),
    "controlnet with its sd1": (None, SD_UNET + CLIP_L + ["control_model.time_embed.0.weight"]),
    "x4 upscaler": (None, SD_UNET + OPEN_CLIP_H + [U + "input_blocks.10.0.skip_connection.bias"]),
    "vae alone": (None, ["encoder.conv_in.weight", "decoder.conv_out.weight"]),
    "lora": (None, ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]),
    "nothing": (None, []),
}


@pytest.mark.parametrize("case", CASES)
def test_family_from_keys(case):
    want, keys = CASES[case]
    assert family_from_keys(keys) == want
    assert family_from_keys(iter(reversed(keys))) == want          # any iterable, any order


# --- real files ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Real checkpoints: the tiny SD 1.x and SDXL (base, refiner) written in the original
    layout, and tiny SD3 / Flux transformers saved in the diffusers layout."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.utils import logging
    from safetensors.torch import save_file

    from dev.tinymodel import build_tiny_model
    from tests.single_file import write_single_file_checkpoint
    from tests.test_single_file_sdxl import build_tiny_sdxl

    logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("checkpoint-keys")
    out = {"sd1": root / "sd1.safetensors", "sdxl": root / "sdxl.safetensors",
           "sdxl-refiner": root / "refiner.safetensors"}
    write_single_file_checkpoint(build_tiny_model(root / "sd1"), out["sd1"])
    # 2 OpenCLIP layers: fewer than diffusers' xl markers (resblocks.9) need; the prefixes suffice.
    write_single_file_checkpoint(build_tiny_sdxl(root / "sdxl", open_clip_layers=2), out["sdxl"])
    write_single_file_checkpoint(build_tiny_sdxl(root / "refiner", refiner=True, open_clip_layers=2),
                                 out["sdxl-refiner"])
    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                pooled_projection_dim=64, out_channels=4)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    for name, model in (("sd3", sd3), ("flux", flux)):
        out[name] = root / f"{name}-transformer.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out[name]))
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sdxl-refiner", "sd3", "flux"])
def test_real_safetensors_files(files, family):
    from safetensors import safe_open

    keys = read_safetensors_keys(files[family])
    with safe_open(str(files[family]), "pt") as f:
        assert sorted(keys) == sorted(f.keys())
    assert family_of_file(files[family]) == family


def torch_save(obj, path: Path, **kwargs) -> Path:
    import torch

    torch.save(obj, str(path), **kwargs)
    return path


def test_ckpt_keys_without_tensors(files, tmp_path):
    import torch
    from safetensors.torch import load_file

    state = load_file(str(files["sd1"]))
    state["model.diffusion_model.out.2.weight"] = torch.nn.Parameter(state["model.diffusion_model.out.2.weight"])
    state["first_stage_model.encoder.conv_in.bias"] = state["first_stage_model.encoder.conv_in.bias"].bfloat16()
    # As the CompVis/Lightning trainers save them: nested state dict beside arbitrary objects.
    ckpt = torch_save({"epoch": 3, "global_step": 875000, "hyper": argparse.Namespace(lr=1e-4, betas=(0.9, 0.99)),
                       "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}}],
                       "state_dict": state}, tmp_path / "sd1.ckpt")
    assert sorted(read_ckpt_keys(ckpt)) == sorted(state)
    assert family_of_file(ckpt) == "sd1" and read_checkpoint_keys(ckpt) == read_ckpt_keys(ckpt)

    nested = torch_save({"state_dict": {"state_dict": dict(list(state.items())[:3])}}, tmp_path / "nested.pt")
    assert read_ckpt_keys(nested) == list(state)[:3]
    flat = torch_save(load_file(str(files["sdxl"])), tmp_path / "flat.pth")
    assert family_of_file(flat) == "sdxl"


class _Trap:
    """Unpickling this with a plain pickle.load would create the directory."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_ckpt_pickle_runs_nothing(tmp_path):
    target = tmp_path / "was-run"
    data = pickle.dumps({"state_dict": {"cond_stage_model.transformer.x": _Trap(str(target)),
                                        "model.diffusion_model.input_blocks.0.0.weight": 1}}, protocol=2)
    archive = tmp_path / "trap.ckpt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("trap/data.pkl", data)
    assert family_of_file(archive) == "sd1"
    assert not target.exists()
    pickle.loads(data)                   # control: the trap is live
    assert target.is_dir()


def test_unreadable_files_raise_value_error(files, tmp_path):
    legacy = torch_save({"a.weight": 1}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="not a zip"):
        read_ckpt_keys(legacy)
    empty_zip = tmp_path / "empty.ckpt"
    zipfile.ZipFile(empty_zip, "w").close()
    with pytest.raises(ValueError, match="data.pkl"):
        read_ckpt_keys(empty_zip)
    broken = tmp_path / "broken.ckpt"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00(X")
    with pytest.raises(ValueError, match="unreadable pickle"):
        read_ckpt_keys(broken)

    cases = {"short": b"\x05\x00", "huge": struct.pack("<Q", 100 * 1024 * 1024 + 1) + b"{}",
             "truncated": struct.pack("<Q", 50) + b'{"a": {}}', "not json": struct.pack("<Q", 4) + b"\xff\xfe{}",
             "a list": struct.pack("<Q", 2) + b"[]"}
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(ValueError):
            read_safetensors_keys(path)
    renamed = tmp_path / "renamed.ckpt"                           # a .safetensors named .ckpt
    shutil.copy(files["sd1"], renamed)
    with pytest.raises(ValueError, match="not a zip"):
        read_checkpoint_keys(renamed)


def test_metadata_is_not_a_key(tmp_path):
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "cond_stage_model.model.token_embedding.weight":
                             {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "sd2-ish.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 4)
    assert read_safetensors_keys(path) == ["cond_stage_model.model.token_embedding.weight"]
    assert family_of_file(path) == "sd2"


def test_reading_never_imports_torch(files, tmp_path):
    import torch
    from safetensors.torch import load_file

    ckpt = tmp_path / "xl.ckpt"
    torch.save({"state_dict": load_file(str(files["sdxl"]))}, str(ckpt))
    code = ("import sys; from common.checkpoint_keys import family_of_file; "
            "print(*(family_of_file(p) for p in sys.argv[1:])); "
            "assert not {'torch', 'safetensors', 'numpy'} & set(sys.modules), sorted(sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, str(files["sd1"]), str(files["sdxl-refiner"]), str(ckpt)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["sd1", "sdxl-refiner", "sdxl"]
