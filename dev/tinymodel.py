"""Build a tiny Stable Diffusion pipeline with random weights, offline.

Why: the local default and the test suite need a real diffusers pipeline
(real classes, real scheduler, real VAE with SD's 1/8 latent scale) that
loads through the same code as production checkpoints, yet builds in a
second on a CPU and never touches a model hub.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

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


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Save a tiny StableDiffusionPipeline folder at out_dir (atomically)."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=out_dir.parent))
    try:
        tok_dir = staging / "_tok"
        write_tokenizer_files(tok_dir)
        pipe = StableDiffusionPipeline(**build_components(tok_dir, seed), requires_safety_checker=False)
        pipe.save_pretrained(staging / "model", safe_serialization=True)
        try:
            os.replace(staging / "model", out_dir)
        except OSError:
            if not (out_dir / "model_index.json").exists():   # not a concurrent builder's finished copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def ensure_tiny_model(out_dir: Path) -> Path:
    """Build the tiny model once; later calls reuse the folder."""
    if (Path(out_dir) / "model_index.json").exists():
        return Path(out_dir)
    return build_tiny_model(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (skipped if it already holds a model)")
    args = parser.parse_args()
    from worker.quiet import quiet_libraries
    quiet_libraries()
    print(ensure_tiny_model(args.out))


if __name__ == "__main__":
    main()
