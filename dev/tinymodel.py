"""Build tiny Stable Diffusion pipelines (SD 1.x, SDXL, SD3, Flux) with random weights, offline.

Why: the local default and the test suite need real diffusers pipelines
(real classes, real schedulers, real VAEs with the 1/8 latent scale, the
families' native sizes) that load through the same code as production
checkpoints, yet build in a second or two on a CPU and never touch a hub.
Importing this module needs only the standard library (dev.localstack
reads TINY_MODEL_NAME without torch).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

TINY_MODEL_NAME = "sdq-tiny"

# Frequent English letter pairs; each becomes two merges (word-inner and
# word-final) so ordinary prompts tokenize into a few hundred ids.
_BIGRAMS = (
    "th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se "
    "ha as ou io le ve co me de hi ri ro ic ne ea ra ce li ch ll be ma si om ur "
    "ca el ta la ns di fo ho pe ec pr no ct us ac ot il tr ly nc et ut ss so rs "
    "un lo wi ge ie wh ee wa em ad ol id ai sh po ut gh ow ay ey ab ig ir ni up"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer_files(folder: Path) -> int:
    """Write CLIP's vocab.json/merges.txt/configs; return the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for pair in dict.fromkeys(_BIGRAMS):
        a, b = pair[0], pair[1]
        merges.append(f"{a} {b}")
        vocab_list.append(a + b)
        merges.append(f"{a} {b}</w>")
        vocab_list.append(a + b + "</w>")
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True}))
    return len(vocab)


def build_components(tokenizer_dir: Path, seed: int = 0) -> dict:
    """Instantiate every SD component with tiny configs and seeded weights."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              model_max_length=77, pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
        in_channels=4, out_channels=4, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, layers_per_block=1, norm_num_groups=16, sample_size=128,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=77, projection_dim=32, layer_norm_eps=1e-5,
    ))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler, "safety_checker": None, "feature_extractor": None,
            "image_encoder": None}


def save_atomically(out_dir: Path, make_pipeline: Callable[[Path], Any]) -> Path:
    """Save make_pipeline(scratch_dir) at out_dir via a staging folder and os.replace, so a reader
    never sees half a model; a concurrent builder's finished copy counts as success."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=out_dir.parent))
    try:
        make_pipeline(staging / "_scratch").save_pretrained(staging / "model", safe_serialization=True)
        try:
            os.replace(staging / "model", out_dir)
        except OSError:
            if not (out_dir / "model_index.json").exists():   # not a concurrent builder's finished copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Save a tiny StableDiffusionPipeline folder at out_dir (atomically)."""
    def make(scratch: Path) -> Any:
        from diffusers import StableDiffusionPipeline

        write_tokenizer_files(scratch / "_tok")
        return StableDiffusionPipeline(**build_components(scratch / "_tok", seed), requires_safety_checker=False)

    return save_atomically(out_dir, make)


def ensure_tiny_model(out_dir: Path) -> Path:
    """Build the tiny model once; later calls reuse the folder."""
    if (Path(out_dir) / "model_index.json").exists():
        return Path(out_dir)
    return build_tiny_model(out_dir)


# --- SDXL, SD3 and Flux -------------------------------------------------------------------------
# Each component is seeded on its own (seed + a fixed offset per role), so a build is deterministic
# and a component the real families share (SDXL base/refiner: text_encoder_2 and the VAE) comes out
# with identical weights in both tiny folders.
_CLIP_1, _CLIP_2, _T5, _VAE, _DENOISER, _REFINER_UNET = 1, 2, 3, 4, 5, 6
XL_VAE = {"scaling_factor": 0.13025}                               # SDXL's own VAE
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}       # SD3's 16-channel VAE
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}      # Flux's 16-channel VAE
FLUX_DEV_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                      "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}


def t5_pieces() -> list[tuple[str, float]]:
    """A SentencePiece-style unigram vocabulary: T5's <pad>/</s>/<unk> at ids 0-2, then printable
    characters and frequent letter pairs, each alone and word-initial ("▁x"); a pair scores better
    than its two letters, so prompts split into a few pieces per word."""
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    pieces += [(p + c, -3.0) for p in ("▁", "") for c in chars]
    pieces += [(p + b, -2.5) for p in ("▁", "") for b in dict.fromkeys(_BIGRAMS)]
    return pieces


def build_t5_tokenizer(model_max_length: int = 512) -> Any:
    """T5's tokenizer over t5_pieces(). `vocab=` (not tokenizer_object=) keeps T5's whitespace/"▁"
    pre-tokenizer and its "</s>" post-processor; extra_ids=0 drops the 100 sentinel tokens.
    512 >= SD3's (256) and Flux's (512) max_sequence_length, as the real tokenizers ship."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_pieces(), extra_ids=0, model_max_length=model_max_length)


def clip_tokenizer(scratch: Path) -> Any:
    """The hand-written CLIP BPE tokenizer (write_tokenizer_files) loaded as CLIPTokenizer."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(scratch / "_tok")
    return CLIPTokenizer(str(scratch / "_tok" / "vocab.json"), str(scratch / "_tok" / "merges.txt"),
                         model_max_length=77, pad_token="<|endoftext|>")


def clip_text_encoder(tokenizer: Any, width: int, projection: bool, seed: int) -> Any:
    """A 2-layer CLIP text model `width` wide (projection_dim = width, as CLIP-L/bigG ship)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=width, intermediate_size=2 * width,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77,
        projection_dim=width, hidden_act="gelu", layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_text_encoder(tokenizer: Any, width: int, seed: int) -> Any:
    """A 2-layer T5 v1.1-style encoder (gated-gelu) `width` wide."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))


def vae(latent_channels: int, seed: int, **factors: float) -> Any:
    """A 4-block VAE (latents 1/8 of the image, as every family ships), narrower than sdq-tiny's and
    without the mid-block attention (128² latent tokens at 1024²): decoding dominates a tiny
    1024² call on a CPU, this keeps it under a second."""
    import torch
    from diffusers import AutoencoderKL

    flux_like = latent_channels == 16        # SD3 and Flux VAEs have no quant convs
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels, layers_per_block=1, norm_num_groups=8, sample_size=1024,
        mid_block_add_attention=False, use_quant_conv=not flux_like, use_post_quant_conv=not flux_like,
        **factors)


def xl_unet(cross_attention_dim: int, time_ids: int, pooled_dim: int, seed: int) -> Any:
    """A 2-level SDXL UNet ("text_time" added conditioning); sample_size 128 makes 1024² native."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=128, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=time_ids * 8 + pooled_dim)


def xl_scheduler() -> Any:
    """EulerDiscreteScheduler as SDXL base and refiner ship it."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, timestep_spacing="leading")


def build_tiny_xl(out_dir: Path, seed: int = 0) -> Path:
    """SDXL base: CLIP (32) + wider CLIP with projection (64), UNet cross-attending to both (96),
    6 time ids + the pooled 64; native 1024², zeros for an empty negative prompt as SDXL."""
    def make(scratch: Path) -> Any:
        from diffusers import StableDiffusionXLPipeline

        tokenizer = clip_tokenizer(scratch)
        return StableDiffusionXLPipeline(
            vae=vae(4, seed + _VAE, **XL_VAE), unet=xl_unet(32 + 64, 6, 64, seed + _DENOISER),
            text_encoder=clip_text_encoder(tokenizer, 32, False, seed + _CLIP_1), tokenizer=tokenizer,
            text_encoder_2=clip_text_encoder(tokenizer, 64, True, seed + _CLIP_2), tokenizer_2=tokenizer,
            scheduler=xl_scheduler(), force_zeros_for_empty_prompt=True)

    return save_atomically(out_dir, make)


def build_tiny_xl_refiner(out_dir: Path, seed: int = 0) -> Path:
    """SDXL refiner: only text_encoder_2 (same weights as the tiny base's) and the base's VAE, so
    base latents (output_type="latent", denoising_end) hand over; 5 time ids (aesthetic score)."""
    def make(scratch: Path) -> Any:
        from diffusers import StableDiffusionXLImg2ImgPipeline

        tokenizer = clip_tokenizer(scratch)
        return StableDiffusionXLImg2ImgPipeline(
            vae=vae(4, seed + _VAE, **XL_VAE), unet=xl_unet(64, 5, 64, seed + _REFINER_UNET),
            text_encoder=None, tokenizer=None,
            text_encoder_2=clip_text_encoder(tokenizer, 64, True, seed + _CLIP_2), tokenizer_2=tokenizer,
            scheduler=xl_scheduler(), requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)

    return save_atomically(out_dir, make)


def build_tiny_sd3(out_dir: Path, seed: int = 0) -> Path:
    """SD3: two CLIPs with projection (32 + 64 = 96 pooled) + T5 (128 = joint attention width,
    wider than the CLIPs' 96 the pipeline pads to it), MMDiT with patch 2 and sample_size 128
    (native 1024²), flow matching with shift 3.0, 16-channel VAE."""
    def make(scratch: Path) -> Any:
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

        tokenizer, t5_tokenizer = clip_tokenizer(scratch), build_t5_tokenizer()
        torch.manual_seed(seed + _DENOISER)
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=32,
            pooled_projection_dim=32 + 64, pos_embed_max_size=96)
        return StableDiffusion3Pipeline(
            transformer=transformer, vae=vae(16, seed + _VAE, **SD3_VAE),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=clip_text_encoder(tokenizer, 32, True, seed + _CLIP_1), tokenizer=tokenizer,
            text_encoder_2=clip_text_encoder(tokenizer, 64, True, seed + _CLIP_2), tokenizer_2=tokenizer,
            text_encoder_3=t5_text_encoder(t5_tokenizer, 128, seed + _T5), tokenizer_3=t5_tokenizer)

    return save_atomically(out_dir, make)


def make_flux(scratch: Path, seed: int, guidance_embeds: bool, scheduler_config: dict) -> Any:
    """A tiny FluxPipeline: CLIP (32, pooled) + T5 (128), 1 double + 2 single blocks, 16-channel VAE."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, t5_tokenizer = clip_tokenizer(scratch), build_t5_tokenizer()
    torch.manual_seed(seed + _DENOISER)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    return FluxPipeline(
        transformer=transformer, vae=vae(16, seed + _VAE, **FLUX_VAE),
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config),
        text_encoder=clip_text_encoder(tokenizer, 32, False, seed + _CLIP_1), tokenizer=tokenizer,
        text_encoder_2=t5_text_encoder(t5_tokenizer, 128, seed + _T5), tokenizer_2=t5_tokenizer)


def build_tiny_flux(out_dir: Path, seed: int = 0) -> Path:
    """Flux-dev: guidance-distilled (guidance_embeds) with dynamic shifting on the image length."""
    return save_atomically(out_dir, lambda scratch: make_flux(scratch, seed, True, FLUX_DEV_SCHEDULER))


def build_tiny_flux_schnell(out_dir: Path, seed: int = 0) -> Path:
    """Flux-schnell: no guidance embedding, a fixed shift of 1.0 (timestep-distilled, few steps)."""
    return save_atomically(out_dir, lambda scratch: make_flux(scratch, seed, False, FLUX_SCHNELL_SCHEDULER))


TINY_MODELS: dict[str, Callable[[Path], Path]] = {
    TINY_MODEL_NAME: build_tiny_model,
    "sdq-tiny-xl": build_tiny_xl,
    "sdq-tiny-xl-refiner": build_tiny_xl_refiner,
    "sdq-tiny-sd3": build_tiny_sd3,
    "sdq-tiny-flux": build_tiny_flux,
    "sdq-tiny-flux-schnell": build_tiny_flux_schnell,
}


def ensure_tiny_models(models_dir: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Build the named tiny models (all by default) under models_dir once; reuse existing folders."""
    paths = []
    for name in (TINY_MODELS if names is None else names):
        folder = Path(models_dir) / name
        paths.append(folder if (folder / "model_index.json").exists() else TINY_MODELS[name](folder))
    return paths


# ControlNets for the tiny SD 1.x and SDXL models, in {models_dir}/controlnet (name -> (base model, seed)).
TINY_CONTROLNETS = {"sdq-tiny-cn": ("sdq-tiny", 21), "sdq-tiny-cn-b": ("sdq-tiny", 22),
                    "sdq-tiny-xl-cn": ("sdq-tiny-xl", 23)}


def build_tiny_controlnet(model_dir: Path, out_dir: Path, seed: int = 21) -> Path:
    """A ControlNet for a tiny SD 1.x or SDXL model: its UNet's encoder (ControlNetModel.from_unet) with random
    zero convolutions and a random hint encoder (ControlNet's start at zero: no visible effect), saved as a
    diffusers folder (config.json + weights), atomically."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet", local_files_only=True)
    controlnet = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=out_dir.parent))
    try:
        controlnet.save_pretrained(staging / "model", safe_serialization=True)
        try:
            os.replace(staging / "model", out_dir)
        except OSError:
            if not (out_dir / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def ensure_tiny_controlnets(models_dir: Path, controlnet_dir: Path | None = None) -> list[Path]:
    """The tiny ControlNets (TINY_CONTROLNETS) in controlnet_dir (default {models_dir}/controlnet), built once."""
    controlnet_dir = Path(controlnet_dir or Path(models_dir) / "controlnet")
    paths = []
    for name, (base, seed) in TINY_CONTROLNETS.items():
        folder = controlnet_dir / name
        paths.append(folder if (folder / "config.json").exists() else
                     build_tiny_controlnet(Path(models_dir) / base, folder, seed))
    return paths


# ESRGAN-class upscalers in {models_dir}/upscalers (file name -> key layout): the same random weights twice.
TINY_UPSCALERS = {"sdq-tiny-esrgan-x4.pth": "realesrgan", "sdq-tiny-esrgan-x4-old.pth": "esrgan"}


def tiny_rrdb_state(seed: int = 31, scale: int = 4) -> dict:
    """A tiny Real-ESRGAN RRDBNet (8 features, 4 growth channels, 1 block) with random weights, BasicSR names."""
    import torch

    from worker.esrgan import RRDBNet, RRDBShape

    torch.manual_seed(seed)
    unshuffle = {4: 1, 2: 2, 1: 4}[scale]
    network = RRDBNet(RRDBShape(3, 3, 8, 4, 1, 2, unshuffle))
    return {k: v.clone() for k, v in network.state_dict().items()}


def as_old_esrgan_keys(state: dict) -> dict:
    """BasicSR names -> the original ESRGAN layout (x4): the inverse of worker.esrgan.as_basicsr_keys."""
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    tops = {"conv_first": 0, "conv_up1": 3, "conv_up2": 6, "conv_hr": 8, "conv_last": 10}
    out = {}
    for key, value in state.items():
        module, kind = key.rsplit(".", 1)
        if module.startswith("body."):
            _, block, rdb, conv = module.split(".")
            out[f"model.1.sub.{block}.RDB{rdb[-1]}.{conv}.0.{kind}"] = value
        elif module == "conv_body":
            out[f"model.1.sub.{blocks}.{kind}"] = value
        else:
            out[f"model.{tops[module]}.{kind}"] = value
    return out


def build_tiny_upscaler(out_file: Path, layout: str = "realesrgan", seed: int = 31) -> Path:
    """A tiny x4 upscaler file: Real-ESRGAN's `.pth` ({"params_ema": ...}) or the original ESRGAN layout."""
    import torch

    state = tiny_rrdb_state(seed)
    payload = {"params_ema": state} if layout == "realesrgan" else as_old_esrgan_keys(state)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    staging = out_file.with_name(f".building-{out_file.name}")
    torch.save(payload, staging)
    os.replace(staging, out_file)
    return out_file


def ensure_tiny_upscalers(upscalers_dir: Path) -> list[Path]:
    """The tiny upscalers (TINY_UPSCALERS) in upscalers_dir, built once."""
    return [path if path.exists() else build_tiny_upscaler(path, layout)
            for path, layout in ((Path(upscalers_dir) / name, layout) for name, layout in TINY_UPSCALERS.items())]


def build_tiny_lora(model_dir: Path, out_file: Path, seed: int = 7, rank: int = 4) -> Path:
    """A LoRA for any tiny family's denoiser (the UNet of SD 1.x/SDXL, the transformer of SD3/Flux)
    on its attention projections, with random non-zero B matrices (peft starts them at zero: no
    visible effect), saved the way the family's pipeline class saves LoRAs."""
    import diffusers
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model_dir, out_file = Path(model_dir), Path(out_file)
    index = json.loads((model_dir / "model_index.json").read_text())
    part = "unet" if index.get("unet", [None])[0] else "transformer"
    denoiser = getattr(diffusers, index[part][1]).from_pretrained(model_dir / part, local_files_only=True)
    torch.manual_seed(seed)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    getattr(diffusers, index["_class_name"]).save_lora_weights(
        str(out_file.parent), weight_name=out_file.name, **{f"{part}_lora_layers": get_peft_model_state_dict(denoiser)})
    return out_file


def build_tiny_embedding(model_dir: Path, out_file: Path, vectors: int = 2, seed: int = 11) -> Path:
    """A random textual inversion embedding for a tiny SD 1.x or SDXL model, in A1111's formats, chosen by
    the file's suffix: `.pt` as A1111's trainer saves it (string_to_param, step, checkpoint), `.safetensors`
    with `emb_params`; for SDXL (a second text encoder) `clip_l` + `clip_g` pairs. The vectors are far
    larger than the tiny encoders' own (std 0.02), so an embedding visibly changes the conditioning."""
    import torch

    model_dir, out_file = Path(model_dir), Path(out_file)
    width = json.loads((model_dir / "text_encoder" / "config.json").read_text())["hidden_size"]
    second = model_dir / "text_encoder_2" / "config.json"
    generator = torch.Generator().manual_seed(seed)

    def random(columns: int) -> Any:
        return torch.randn(vectors, columns, generator=generator)

    out_file.parent.mkdir(parents=True, exist_ok=True)
    if second.exists():
        from safetensors.torch import save_file

        save_file({"clip_l": random(width), "clip_g": random(json.loads(second.read_text())["hidden_size"])},
                  str(out_file))
    elif out_file.suffix == ".pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": random(width)}, "name": out_file.stem,
                    "step": 500, "sd_checkpoint": "0123456789", "sd_checkpoint_name": model_dir.name}, out_file)
    else:
        from safetensors.torch import save_file

        save_file({"emb_params": random(width)}, str(out_file))
    return out_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?",
                        help=f"folder for {TINY_MODEL_NAME} (skipped if it already holds a model)")
    parser.add_argument("--all", type=Path, metavar="MODELS_DIR",
                        help=f"build every tiny model ({', '.join(TINY_MODELS)}), ControlNet and upscaler "
                             "missing from MODELS_DIR")
    args = parser.parse_args()
    if (args.out is None) == (args.all is None):
        parser.error("give either OUT or --all MODELS_DIR")
    from worker.quiet import quiet_libraries
    quiet_libraries()
    if args.all is not None:
        print("\n".join(str(p) for p in ensure_tiny_models(args.all)))
        print("\n".join(str(p) for p in ensure_tiny_controlnets(args.all)))
        print("\n".join(str(p) for p in ensure_tiny_upscalers(Path(args.all) / "upscalers")))
    else:
        print(ensure_tiny_model(args.out))


if __name__ == "__main__":
    main()
