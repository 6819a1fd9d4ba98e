"""LoRA training on a warm SD 1.x/2.x or SDXL pipeline (issue 16): examples in, a LoRA file out.

Why here and shaped like this: a worker already holds the model warm, so a
training job borrows its text encoders and VAE (read only, under no_grad) and
trains a LoRA on its own copy of the UNet; the warm pipeline keeps serving
inference unchanged. The loop follows diffusers' train_text_to_image_lora(_sdxl).py
(peft adapter on the attention projections, accelerate for mixed precision and
gradient accumulation, AdamW on the LoRA parameters only, epsilon or
v-prediction loss). Every random draw of optimizer step N comes from a
generator seeded with (seed, N) and the data order from the step number, so a
run resumed from a checkpoint (TrainingState, bytes for S3) ends with the same
weights as one that never stopped.

No torch, diffusers or peft at import (as worker/pipelines): they load inside the functions.
"""
from __future__ import annotations

import copy
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from PIL import Image

from worker.speedups import FUSED_ATTENTION

if TYPE_CHECKING:
    import torch

TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")   # the attention projections, as diffusers' scripts train
BUCKET_RATIOS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)   # width / height of the aspect-ratio buckets
MIXED_PRECISIONS = ("no", "fp16", "bf16")
STATE_FORMAT = 2   # TrainingState's byte layout; a later change bumps it so old checkpoints are refused, not misread
READABLE_FORMATS = (1, 2)   # 1: before the GradScaler's state was kept (a resume then starts a fresh scaler)


@dataclass
class TrainingConfig:
    """What a training job may choose. alpha None means alpha = rank (a LoRA scale of 1)."""

    max_steps: int
    rank: int = 4
    alpha: float | None = None
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"          # any name diffusers.optimization.get_scheduler knows
    lr_warmup_steps: int = 0
    batch_size: int = 1
    gradient_accumulation: int = 1
    resolution: int = 512
    mixed_precision: str = "no"             # "no" | "fp16" | "bf16"
    seed: int = 0
    trigger_word: str = ""                  # prepended to every caption when set
    checkpoint_every: int = 0               # call save_state every N optimizer steps (0: never)
    noise_offset: float = 0.0
    gradient_checkpointing: bool = False    # recompute activations in the backward (SDXL at 1024² on 24 GB cards)

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = float(self.rank)
        if self.max_steps < 1 or self.rank < 1 or self.batch_size < 1 or self.gradient_accumulation < 1:
            raise ValueError("max_steps, rank, batch_size and gradient_accumulation must be at least 1")
        if self.resolution < 64 or self.resolution % 64:
            raise ValueError("resolution must be a multiple of 64")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}")


@dataclass
class Example:
    """One training image and its caption, as the dataset holds them. `original_size` (height, width): the size
    the image had before a loader shrank it (SDXL's size conditioning); None: the image's own."""

    image: Image.Image
    caption: str
    original_size: tuple[int, int] | None = None


@dataclass
class Sample:
    """An example made ready: pixels in [-1, 1] (C, H, W) at its bucket's size (dropped once encoded: only the
    latents are trained on), and SDXL's size conditioning."""

    pixels: Any
    caption: str
    original_size: tuple[int, int]      # (height, width) before resizing
    crop_top_left: tuple[int, int]      # (top, left) of the center crop in the resized image
    size: tuple[int, int] = (0, 0)      # (height, width) of the bucket

    def __post_init__(self) -> None:
        if self.size == (0, 0) and self.pixels is not None:
            self.size = tuple(self.pixels.shape[-2:])


@dataclass
class TrainingState:
    """A checkpoint: enough to continue from `step` as if never stopped. lora_state_dict is peft's layout."""

    step: int
    lora_state_dict: dict[str, Any]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng_states: dict[str, Any]
    losses: list[float] = field(default_factory=list)
    scaler_state: dict[str, Any] = field(default_factory=dict)   # fp16's GradScaler (its loss scale), CUDA only


@dataclass
class LoraResult:
    """The trained LoRA: diffusers-format weights ("unet." keys), its peft config, one loss per optimizer step."""

    state_dict: dict[str, Any]
    losses: list[float]
    rank: int
    alpha: float
    target_modules: tuple[str, ...] = TARGET_MODULES

    @property
    def steps(self) -> int:
        return len(self.losses)


# --- data ---------------------------------------------------------------------------------------

def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The (width, height) an image trains at: the bucket ratio nearest its own (in log space), about
    resolution² pixels, both sides multiples of 64 (the VAE's 8 times the UNet's downsampling)."""
    ratio = min(BUCKET_RATIOS, key=lambda r: abs(math.log(r) - math.log(width / height)))

    def side(length: float) -> int:
        return max(64, round(length / 64) * 64)

    return side(resolution * math.sqrt(ratio)), side(resolution / math.sqrt(ratio))


def shrink_to_bucket(image: Image.Image, resolution: int) -> Image.Image:
    """The image scaled down to just cover its bucket (what resize_and_crop does first), so a loader holds no
    more pixels than training uses; an image already that small is returned as it is."""
    width, height = bucket_size(image.width, image.height, resolution)
    scale = max(width / image.width, height / image.height)
    if scale >= 1:
        return image
    return image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                        Image.BICUBIC)


def resize_and_crop(image: Image.Image, width: int, height: int) -> tuple[Image.Image, tuple[int, int]]:
    """Scale the image to cover width x height, then center-crop it; return it and the crop's (top, left)."""
    scale = max(width / image.width, height / image.height)
    resized = image.convert("RGB").resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC)
    top, left = (resized.height - height) // 2, (resized.width - width) // 2
    return resized.crop((left, top, left + width, top + height)), (top, left)


def caption_with_trigger(caption: str, trigger_word: str) -> str:
    """The trigger word first, so prompts that start with it call up what the LoRA learned."""
    caption = caption.strip()
    if not trigger_word:
        return caption
    return f"{trigger_word}, {caption}" if caption else trigger_word


def prepare_samples(examples: Sequence[Example], config: TrainingConfig) -> list[Sample]:
    """Each example resized, cropped to its bucket and captioned; done once per run."""
    import numpy as np
    import torch

    samples = []
    for example in examples:
        width, height = bucket_size(example.image.width, example.image.height, config.resolution)
        image, crop = resize_and_crop(example.image, width, height)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        original = example.original_size or (example.image.height, example.image.width)
        samples.append(Sample(pixels, caption_with_trigger(example.caption, config.trigger_word), original, crop))
    return samples


def plan_epoch(samples: Sequence[Sample], batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """One epoch's batches (indices into samples): each batch from one bucket, shuffled by (seed, epoch).

    Why a pure function of the epoch: a resumed run finds the batch of any step without replaying the past.
    """
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    buckets: dict[tuple[int, int], list[int]] = {}
    for index, sample in enumerate(samples):
        buckets.setdefault(sample.size, []).append(index)
    batches = []
    for size in sorted(buckets):
        members = buckets[size]
        order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        batches += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def batch_for(samples: Sequence[Sample], batch_size: int, micro_step: int, seed: int) -> list[int]:
    """The batch of micro-step `micro_step` (optimizer step x accumulation + k), epoch after epoch."""
    per_epoch = len(plan_epoch(samples, batch_size, 0, seed))
    return plan_epoch(samples, batch_size, micro_step // per_epoch, seed)[micro_step % per_epoch]


# --- model --------------------------------------------------------------------------------------

def check_pipeline(pipe: Any) -> bool:
    """Whether the pipeline is SDXL (True) or SD 1.x/2.x (False); refuse what this trainer cannot train."""
    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(pipe, "text_encoder", None) is None:
        raise ValueError("LoRA training needs an SD 1.x/2.x or SDXL base pipeline (a UNet and its text encoder)")
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def copy_unet(pipe: Any) -> Any:
    """The UNet to train: a deep copy, eager (no compiled forward) with plain attention (LoRA layers sit on
    to_q/k/v, which fused QKV bypasses). Why a copy: the warm pipeline keeps serving with untouched weights."""
    unet = copy.deepcopy(pipe.unet)
    if getattr(unet, "_compiled_call_impl", None) is not None:
        unet._compiled_call_impl = None
    pair = getattr(pipe, FUSED_ATTENTION, None)
    if pair is not None:
        unet.set_attn_processor(dict(pair[0]))
    return unet


def add_lora(unet: Any, config: TrainingConfig) -> list[Any]:
    """Freeze the UNet and add a gaussian-initialised LoRA (B = 0: no effect yet); return its parameters in fp32.

    Why fp32: a half-precision base still trains LoRA weights in fp32 (GradScaler refuses fp16 gradients).
    """
    import torch
    from peft import LoraConfig

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):    # peft's init draws from the global CPU generator
        torch.manual_seed(config.seed)
        unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                    target_modules=list(TARGET_MODULES)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    return params


def training_precision(requested: str, weights_dtype: Any, device: Any) -> str:
    """The autocast a run uses on `device` for base weights of `weights_dtype` when `requested` was asked for.

    Why not always what was asked: on CUDA a warm pipeline's weights are half precision (worker.dtype), so its
    activations and gradients are half precision whatever the request says; fp16 ones need accelerate's
    GradScaler (mixed precision "fp16") or small gradients underflow to zero and the LoRA learns nothing. So
    fp16 weights train under "fp16" unless "bf16" was asked, bf16 weights under "bf16"; fp32 weights (the CPU)
    take the request as it is.
    """
    import torch

    if getattr(device, "type", str(device)) != "cuda" or weights_dtype == torch.float32:
        return requested
    if weights_dtype == torch.float16:
        return "bf16" if requested == "bf16" else "fp16"
    return "bf16"


def fresh_accelerator(config: TrainingConfig, device: Any, precision: str | None = None) -> Any:
    """An Accelerator for this run on the pipeline's device.

    Why reset first: accelerate keeps one process-wide state and refuses a second Accelerator with
    another mixed precision; a worker runs many jobs, each with its own settings.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(mixed_precision=precision or config.mixed_precision,
                       gradient_accumulation_steps=config.gradient_accumulation,
                       cpu=device.type == "cpu")


# --- conditioning -------------------------------------------------------------------------------

@dataclass
class Encoded:
    """What the frozen parts give each sample once: latent mean/std and text conditioning."""

    latent_mean: list[Any]
    latent_std: list[Any]
    prompt_embeds: dict[str, Any]            # caption -> (tokens, width)
    pooled_embeds: dict[str, Any]            # caption -> (width,), SDXL only


def encode_samples(pipe: Any, samples: Sequence[Sample], sdxl: bool, device: Any) -> Encoded:
    """Run the VAE encoder and the text encoders over the dataset once (no_grad, the warm modules as they are).

    Why once: they are frozen, so per-step work is only the UNet; the latent is then drawn per step
    from the cached mean/std with that step's generator. An fp16 VAE marked force_upcast encodes
    through an fp32 copy (SDXL's overflows in fp16), never by converting the shared one.
    """
    import torch

    vae = pipe.vae
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae = copy.deepcopy(vae).float()
    means, stds = [], []
    with torch.no_grad():
        for sample in samples:
            dist = vae.encode(sample.pixels.unsqueeze(0).to(device, vae.dtype)).latent_dist
            means.append(dist.mean[0].float())
            stds.append(dist.std[0].float())
        prompts, pooled = {}, {}
        for caption in dict.fromkeys(s.caption for s in samples):
            if sdxl:
                embeds, _, pool, _ = pipe.encode_prompt(prompt=caption, device=device, num_images_per_prompt=1,
                                                        do_classifier_free_guidance=False)
                pooled[caption] = pool[0]
            else:
                embeds, _ = pipe.encode_prompt(caption, device, 1, False)
            prompts[caption] = embeds[0]
    return Encoded(means, stds, prompts, pooled)


def time_ids(sample: Sample) -> list[int]:
    """SDXL's size conditioning: original size, crop top-left, target size (as its LoRA script builds it)."""
    return [*sample.original_size, *sample.crop_top_left, *sample.size]


# --- the loop -----------------------------------------------------------------------------------

def step_generator(seed: int, step: int) -> Any:
    """The CPU generator of every random draw in optimizer step `step` (device independent, resumable)."""
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + 7919 * step + 1)


def compute_loss(unet: Any, noise_scheduler: Any, pipe: Any, encoded: Encoded, samples: Sequence[Sample],
                 indices: list[int], sdxl: bool, config: TrainingConfig, generator: Any, device: Any,
                 dtype: Any) -> Any:
    """The denoising loss of one batch: noise the latents at random timesteps, predict, MSE against
    the noise (epsilon) or the velocity (v_prediction), as the model's scheduler config says. `dtype`: the
    UNet's weights' (read once per run: diffusers' `unet.dtype` walks every module)."""
    import torch
    import torch.nn.functional as F

    mean = torch.stack([encoded.latent_mean[i] for i in indices])
    std = torch.stack([encoded.latent_std[i] for i in indices])
    latents = (mean + std * torch.randn(mean.shape, generator=generator).to(device)) * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device)
    if config.noise_offset:
        noise = noise + config.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(indices),),
                              generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    captions = [samples[i].caption for i in indices]
    kwargs: dict[str, Any] = {}
    if sdxl:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.stack([encoded.pooled_embeds[c] for c in captions]).to(dtype),
            "time_ids": torch.tensor([time_ids(samples[i]) for i in indices], device=device, dtype=dtype)}
    hidden = torch.stack([encoded.prompt_embeds[c] for c in captions]).to(dtype)
    prediction = unet(noisy.to(dtype), timesteps, hidden, return_dict=False, **kwargs)[0]
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"cannot train a model with prediction_type {kind!r}")
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def restore(unet: Any, optimizer: Any, lr_scheduler: Any, state: TrainingState) -> None:
    """Load a checkpoint's LoRA weights, optimizer and schedule into a fresh run."""
    import torch
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state.lora_state_dict)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"the checkpoint does not fit this LoRA ({len(unexpected)} unexpected keys)")
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    optimizer.load_state_dict(state.optimizer_state)
    lr_scheduler.load_state_dict(state.scheduler_state)
    if "torch" in state.rng_states:
        torch.set_rng_state(state.rng_states["torch"])


def capture(step: int, unet: Any, optimizer: Any, lr_scheduler: Any, losses: list[float],
            scaler: Any = None) -> TrainingState:
    """A checkpoint after optimizer step `step`, on the CPU (it leaves the device for S3). `scaler`: fp16's
    GradScaler, whose loss scale a resumed run must start from (a fresh one skips steps finding it again)."""
    import torch
    from peft.utils import get_peft_model_state_dict

    def cpu(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {k: cpu(v) for k, v in value.items()}
        if isinstance(value, list):
            return [cpu(v) for v in value]
        return value

    return TrainingState(step=step, lora_state_dict=cpu(get_peft_model_state_dict(unet)),
                         optimizer_state=cpu(optimizer.state_dict()), scheduler_state=cpu(lr_scheduler.state_dict()),
                         rng_states={"torch": torch.get_rng_state()}, losses=list(losses),
                         scaler_state=cpu(scaler.state_dict()) if scaler is not None else {})


def lora_weights(unet: Any) -> dict[str, Any]:
    """The trained LoRA in the layout pipelines' save_lora_weights write: diffusers names, "unet." prefixed."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    weights = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {f"unet.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}


def train_lora(pipe: Any, examples: Sequence[Example], config: TrainingConfig,
               on_step: Callable[[int, int, float], None] | None = None, resume: TrainingState | None = None,
               save_state: Callable[[TrainingState], None] | None = None,
               checkpoint_now: Callable[[], bool] | None = None) -> LoraResult:
    """Train a LoRA on `pipe`'s UNet (a copy of it) for config.max_steps optimizer steps in all.

    `on_step(step, total, loss)` after every optimizer step; whatever it raises (a cancel) stops the run
    and propagates. `save_state(TrainingState)` every config.checkpoint_every steps, and after any step for which
    `checkpoint_now()` is true (a worker about to stop); `resume` continues from such a state (its step counts
    toward max_steps). The pipeline itself is never modified.
    """
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    if not examples:
        raise ValueError("no training examples")
    sdxl = check_pipeline(pipe)
    device = pipe.unet.device
    samples = prepare_samples(examples, config)
    encoded = encode_samples(pipe, samples, sdxl, device)
    for sample in samples:                 # the latents are what trains: the fp32 pixels (12 MB at 1024²) go
        sample.pixels = None
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    weights_dtype = pipe.unet.dtype
    accelerator = fresh_accelerator(config, device, training_precision(config.mixed_precision, weights_dtype, device))
    unet = copy_unet(pipe)
    unet.train()
    if config.gradient_checkpointing:     # activations recomputed in the backward: far less memory, ~30 % slower
        unet.enable_gradient_checkpointing()
    params = add_lora(unet, config)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.max_steps)
    losses: list[float] = []
    start = 0
    with torch.random.fork_rng(devices=[]):      # a resumed run's global RNG, without leaking into the worker
        if resume is not None:
            restore(unet, optimizer, lr_scheduler, resume)
            if resume.scaler_state and accelerator.scaler is not None:
                accelerator.scaler.load_state_dict(resume.scaler_state)
            start, losses = resume.step, list(resume.losses)
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        for step in range(start, config.max_steps):
            generator = step_generator(config.seed, step)
            total = 0.0
            for k in range(config.gradient_accumulation):
                indices = batch_for(samples, config.batch_size, step * config.gradient_accumulation + k, config.seed)
                with accelerator.accumulate(unet):
                    loss = compute_loss(unet, noise_scheduler, pipe, encoded, samples, indices, sdxl, config,
                                        generator, device, weights_dtype)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                total += loss.detach().item()
            losses.append(total / config.gradient_accumulation)
            done = step + 1
            due = bool(config.checkpoint_every) and done % config.checkpoint_every == 0
            if save_state is not None and done < config.max_steps and (due or (checkpoint_now and checkpoint_now())):
                # before on_step: a cancel (or a hand-back) at step N keeps checkpoint N
                save_state(capture(done, accelerator.unwrap_model(unet), optimizer, lr_scheduler, losses,
                                   accelerator.scaler))
            if on_step is not None:
                on_step(done, config.max_steps, losses[-1])
    trained = accelerator.unwrap_model(unet)
    result = LoraResult(lora_weights(trained), losses, config.rank, float(config.alpha))
    accelerator.free_memory()
    return result


# --- files and bytes ----------------------------------------------------------------------------

def save_lora_file(result: LoraResult, path: Path | str) -> Path:
    """Write the LoRA as a .safetensors that load_lora_weights reads (worker/generation.py applied_loras),
    with its peft config in diffusers' metadata so an alpha other than the rank scales as trained."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"unet.r": result.rank, "unet.lora_alpha": result.alpha, "unet.target_modules": list(result.target_modules)}
    save_file(result.state_dict, str(path),
              metadata={"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config, sort_keys=True)})
    return path


def state_to_bytes(state: TrainingState) -> bytes:
    """A checkpoint as bytes (torch.save of plain containers and tensors: loadable with weights_only)."""
    import torch

    buffer = io.BytesIO()
    torch.save({"format": STATE_FORMAT, "step": state.step, "lora": state.lora_state_dict,
                "optimizer": state.optimizer_state, "scheduler": state.scheduler_state,
                "rng": state.rng_states, "losses": list(state.losses), "scaler": state.scaler_state}, buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes) -> TrainingState:
    """Read state_to_bytes' output back; weights_only, so a stored checkpoint can never run code."""
    import torch

    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
        raise ValueError("not a training checkpoint of this version")
    return TrainingState(step=payload["step"], lora_state_dict=payload["lora"],
                         optimizer_state=payload["optimizer"], scheduler_state=payload["scheduler"],
                         rng_states=payload["rng"], losses=list(payload["losses"]),
                         scaler_state=payload.get("scaler") or {})
