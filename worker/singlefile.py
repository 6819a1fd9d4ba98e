"""Write a diffusers SD 1.x or SDXL pipeline folder as ONE original-layout checkpoint.

Why: the catalog and worker serve single `.safetensors` files in the original
CompVis/LDM key layout (what civitai hands out), loaded offline with
`from_single_file(config=<local diffusers folder>)`, and a model merge (the
AUTOMATIC1111 web UI's checkpoint merger, worker/mergejob.py) reads and writes
that layout: a catalog model that is a diffusers folder is converted first, so
it merges with single files and the key's own uploads. The tests make their
single files the same way from the tiny models (no such file can be downloaded
here): the inverse of diffusers' single-file conversion.

The renaming follows diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py`
(huggingface/diffusers, Apache-2.0), which hard-codes SD 1.5's 4 blocks x 2
layers; here every block/layer index is derived from the component configs, so
the same code writes the tiny model (2 UNet blocks x 1 layer, 4 VAE blocks x 1
layer) and a full-size SD 1.x. Every weight must be claimed by exactly one rule:
an unmapped key raises instead of being silently dropped.

SDXL (the pipeline folder's model_index.json names an SDXL class) uses the same
UNet and VAE layout plus the "text_time" embedding (`label_emb.0.0/0.2`), keeps
text_encoder (CLIP ViT-L) under `conditioner.embedders.0.transformer.` and writes
text_encoder_2 in the OpenCLIP layout under `conditioner.embedders.1.model.`
(fused q/k/v `in_proj_*`, transposed `text_projection`): the inverse of diffusers'
`convert_open_clip_checkpoint`. A refiner folder (no text_encoder) has only the
OpenCLIP encoder, under `conditioner.embedders.0.model.`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")

# Inside a UNet ResnetBlock2D: (diffusers, LDM ResBlock).
UNET_RESNET_PARTS = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                     ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."),
                     ("conv_shortcut.", "skip_connection."))
# Inside a VAE ResnetBlock2D: only the shortcut is named differently.
VAE_RESNET_PARTS = (("norm1.", "norm1."), ("conv1.", "conv1."), ("norm2.", "norm2."), ("conv2.", "conv2."),
                    ("conv_shortcut.", "nin_shortcut."))
# Inside the VAE mid-block attention: diffusers' Linear q/k/v/out vs LDM's 1x1 convs.
VAE_ATTENTION_PARTS = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                       ("to_out.0.", "proj_out."))
# Inside a transformers CLIP encoder layer vs an OpenCLIP resblock; q/k/v are fused afterwards.
OPEN_CLIP_LAYER_PARTS = (("self_attn.q_proj.", "attn.q_proj."), ("self_attn.k_proj.", "attn.k_proj."),
                         ("self_attn.v_proj.", "attn.v_proj."), ("self_attn.out_proj.", "attn.out_proj."),
                         ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                         ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))
KEEP = None  # the remainder of the key is the same in both layouts


def _layers(config: dict) -> int:
    layers = config["layers_per_block"]
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ValueError(f"per-block layers_per_block {layers} has no SD 1.x layout")
        layers = layers[0]
    return int(layers)


def unet_rules(config: dict) -> list[tuple[str, str, tuple | None]]:
    """(diffusers prefix, LDM prefix, inner renames) for a UNet2DConditionModel config.

    LDM numbers the UNet's layers flat: input_blocks.0 is conv_in, then each down
    block contributes `layers` (resnet, attention) entries and, except the last,
    one downsampler entry; output_blocks mirror that with `layers + 1` entries per
    up block, the upsampler riding in the block's last entry (after the attention
    when the block has one). SDXL's "text_time" embedding (add_embedding) is
    LDM's label_emb.0; the number of transformer layers inside an attention
    (transformer_layers_per_block) does not change any LDM index.
    """
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"mid block {config['mid_block_type']} has no SD 1.x layout")
    layers = _layers(config)
    per = layers + 1
    down, up = config["down_block_types"], config["up_block_types"]
    rules: list[tuple[str, str, tuple | None]] = [
        ("time_embedding.linear_1.", "time_embed.0.", KEEP), ("time_embedding.linear_2.", "time_embed.2.", KEEP),
        ("conv_in.", "input_blocks.0.0.", KEEP), ("conv_norm_out.", "out.0.", KEEP), ("conv_out.", "out.2.", KEEP),
        ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET_PARTS),
        ("mid_block.attentions.0.", "middle_block.1.", KEEP),
        ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET_PARTS),
    ]
    if config.get("addition_embed_type") == "text_time":
        rules += [("add_embedding.linear_1.", "label_emb.0.0.", KEEP),
                  ("add_embedding.linear_2.", "label_emb.0.2.", KEEP)]
    for i, kind in enumerate(down):
        for j in range(layers):
            rules.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per * i + j + 1}.0.", UNET_RESNET_PARTS))
            if "CrossAttn" in kind:
                rules.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per * i + j + 1}.1.", KEEP))
        if i < len(down) - 1:
            rules.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per * (i + 1)}.0.op.", KEEP))
    for i, kind in enumerate(up):
        attention = "CrossAttn" in kind
        for j in range(per):
            rules.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per * i + j}.0.", UNET_RESNET_PARTS))
            if attention:
                rules.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per * i + j}.1.", KEEP))
        if i < len(up) - 1:
            rules.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{per * i + layers}.{2 if attention else 1}.",
                          KEEP))
    return rules


def vae_rules(config: dict) -> list[tuple[str, str, tuple | None]]:
    """(diffusers prefix, LDM prefix, inner renames) for an AutoencoderKL config.

    The encoder has `layers` resnets per down block, the decoder `layers + 1` per
    up block, and LDM numbers the decoder's up blocks in reverse (diffusers'
    up_blocks.0 is LDM's up.{n-1}).
    """
    layers = _layers(config)
    n = len(config["block_out_channels"])
    rules: list[tuple[str, str, tuple | None]] = [
        ("quant_conv.", "quant_conv.", KEEP), ("post_quant_conv.", "post_quant_conv.", KEEP)]
    for part in ("encoder", "decoder"):
        rules += [
            (f"{part}.conv_in.", f"{part}.conv_in.", KEEP), (f"{part}.conv_out.", f"{part}.conv_out.", KEEP),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", KEEP),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET_PARTS),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET_PARTS),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION_PARTS),
        ]
    for i in range(n):
        for j in range(layers):
            rules.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET_PARTS))
        for j in range(layers + 1):
            rules.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.",
                          VAE_RESNET_PARTS))
        if i < n - 1:
            rules.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", KEEP))
            rules.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.", KEEP))
    return rules


def rename(state: dict, rules: list[tuple[str, str, tuple | None]], what: str) -> dict:
    """Apply prefix rules; each key must match exactly one rule (and one inner part, if any)."""
    out = {}
    for key, tensor in state.items():
        matches = [r for r in rules if key.startswith(r[0])]
        if len(matches) != 1:
            raise KeyError(f"{what} weight {key!r} matches {len(matches)} conversion rules")
        hf_prefix, sd_prefix, parts = matches[0]
        rest = key[len(hf_prefix):]
        if parts is not KEEP:
            inner = [(a, b) for a, b in parts if rest.startswith(a)]
            if len(inner) != 1:
                raise KeyError(f"{what} weight {key!r} has no known inner name")
            rest = inner[0][1] + rest[len(inner[0][0]):]
        new = sd_prefix + rest
        if new in out:
            raise KeyError(f"{what} weights collide on {new!r}")
        out[new] = tensor
    return out


def convert_vae(state: dict, config: dict) -> dict:
    converted = rename(state, vae_rules(config), "VAE")
    for key, tensor in converted.items():
        # diffusers' mid-block attention uses Linear layers; LDM's AttnBlock 1x1 Conv2d.
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) \
                and tensor.dim() == 2:
            converted[key] = tensor.reshape(*tensor.shape, 1, 1)
    return converted


def convert_text_encoder(state: dict, prefix: str = CLIP_PREFIX) -> dict:
    """SD 1.x keeps transformers' CLIPTextModel keys under cond_stage_model.transformer.
    (SDXL: conditioner.embedders.0.transformer.).

    transformers >= 5.6 saves CLIPTextModel without its `text_model.` wrapper;
    the original layout (and diffusers' detector) always has it.
    """
    return {prefix + key.removeprefix("text_model."): tensor for key, tensor in state.items()
            if not key.endswith("position_ids")}


def open_clip_rules(config: dict) -> list[tuple[str, str, tuple | None]]:
    """(transformers prefix, OpenCLIP prefix, inner renames) for a CLIPTextModelWithProjection
    config, keys taken without the `text_model.` wrapper. Inverse of diffusers'
    DIFFUSERS_TO_LDM_MAPPING["openclip"]; a full key as prefix maps that one weight."""
    rules: list[tuple[str, str, tuple | None]] = [
        ("embeddings.token_embedding.", "token_embedding.", KEEP),
        ("embeddings.position_embedding.weight", "positional_embedding", KEEP),
        ("final_layer_norm.", "ln_final.", KEEP), ("text_projection.weight", "text_projection", KEEP)]
    for i in range(int(config["num_hidden_layers"])):
        rules.append((f"encoder.layers.{i}.", f"transformer.resblocks.{i}.", OPEN_CLIP_LAYER_PARTS))
    return rules


def convert_open_clip(state: dict, config: dict, prefix: str) -> dict:
    """SDXL's second text encoder in the OpenCLIP layout: q/k/v concatenated (in that
    order) into attn.in_proj_weight/bias, text_projection stored as the transpose of
    the Linear weight (OpenCLIP computes x @ text_projection)."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    converted = rename(state, open_clip_rules(config), "OpenCLIP text encoder")
    converted["text_projection"] = converted["text_projection"].T
    for i in range(int(config["num_hidden_layers"])):
        block = f"transformer.resblocks.{i}.attn."
        for param in ("weight", "bias"):
            converted[f"{block}in_proj_{param}"] = torch.cat(
                [converted.pop(f"{block}{p}_proj.{param}") for p in "qkv"])
    return {prefix + key: tensor for key, tensor in converted.items()}


def weight_files(folder: Path, name: str) -> list[Path]:
    """A component's safetensors weights: `name`, else its fp16 variant, else the shards its index lists
    (a folder saved by diffusers or transformers holds one of these)."""
    stem = name.removesuffix(".safetensors")
    for candidate in (folder / name, folder / f"{stem}.fp16.safetensors"):
        if candidate.is_file():
            return [candidate]
    index = folder / f"{name}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [folder / shard for shard in shards]
    raise FileNotFoundError(f"{folder.name}: no {name} (nor its fp16 variant or shards) to convert")


def write_single_file_checkpoint(diffusers_dir: Path, out_file: Path) -> None:
    """Convert the unet, vae and text encoder(s) of a diffusers SD 1.x or SDXL folder
    into one original-layout .safetensors file at out_file (written atomically).

    The layout follows model_index.json's `_class_name`: an SDXL pipeline class gets
    the SDXL layout (a refiner, i.e. one without text_encoder, the refiner's);
    anything else the SD 1.x layout."""
    from safetensors.torch import load_file, save_file

    diffusers_dir, out_file = Path(diffusers_dir), Path(out_file)

    def component(name: str, weights: str) -> tuple[dict, dict]:
        config = json.loads((diffusers_dir / name / "config.json").read_text())
        return {k: v for path in weight_files(diffusers_dir / name, weights) for k, v in load_file(str(path)).items()}, \
            config

    index_file = diffusers_dir / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {}
    unet, unet_config = component("unet", "diffusion_pytorch_model.safetensors")
    vae, vae_config = component("vae", "diffusion_pytorch_model.safetensors")
    state = {UNET_PREFIX + k: v for k, v in rename(unet, unet_rules(unet_config), "UNet").items()}
    state.update({VAE_PREFIX + k: v for k, v in convert_vae(vae, vae_config).items()})
    if index.get("_class_name") in SDXL_PIPELINES:
        open_clip, open_clip_config = component("text_encoder_2", "model.safetensors")
        if (index.get("text_encoder") or [None])[0] is None:      # refiner: the OpenCLIP encoder only
            state.update(convert_open_clip(open_clip, open_clip_config, REFINER_OPEN_CLIP_PREFIX))
        else:
            text, _ = component("text_encoder", "model.safetensors")
            state.update(convert_text_encoder(text, SDXL_CLIP_PREFIX))
            state.update(convert_open_clip(open_clip, open_clip_config, SDXL_OPEN_CLIP_PREFIX))
    else:
        text, _ = component("text_encoder", "model.safetensors")
        state.update(convert_text_encoder(text))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    staging = out_file.with_name(f".{out_file.name}.partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(staging), metadata={"format": "pt"})
    os.replace(staging, out_file)
