"""GPU speed-ups applied once to a warm pipeline, each switchable and reported in /health.

Why once, at load: they change how the warm modules run (attention kernel,
memory layout, fused projections, compiled forward), never per job, so the
per-request views that share the modules get them for free.

- `worker.sdpa` (on): PyTorch's scaled_dot_product_attention (flash /
  memory-efficient kernels); off: diffusers' classic attention.
- `worker.channels_last` (on with CUDA): UNet and VAE in channels-last memory
  layout, faster convolutions on tensor cores.
- `worker.fuse_qkv` (off): one QKV matmul per attention instead of three. A
  job with LoRAs runs on the unfused attention (its LoRA layers sit on
  to_q/to_k/to_v), then the fused one is back; nothing is recomputed.
- `worker.tf32` (on with CUDA): TF32 matmuls and convolutions for the fp32
  parts (process-wide).
- `worker.compile` (off): torch.compile of the denoiser's forward (the UNet;
  the transformer of SD3 and Flux), warmed up at
  the default size before the worker reports ready. A second shape marks the
  batch dimension dynamic (one more compile); new sizes and adding or
  removing LoRA layers recompile, bounded by torch._dynamo's cache size
  limit; keep sizes and LoRA sets to a few when it is on.

SD3 and Flux run their own SDPA attention processors and are linear layers:
`sdpa: false`, `fuse_qkv` and channels-last (but for the VAE) apply to UNet
families only; /health lists the worker's settings, not per model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("sdqueue.worker")
FUSED_ATTENTION = "sdq_fused_attention"   # pipeline attribute: (plain processors, fused processors) of the UNet


@dataclass(frozen=True)
class Speedups:
    """Which speed-ups a worker applies (resolved for its device)."""

    sdpa: bool = True
    channels_last: bool = False
    fuse_qkv: bool = False
    tf32: bool = False
    compile: bool = False

    @classmethod
    def for_device(cls, settings: Any, device: str) -> "Speedups":
        """The worker.* switches; channels_last, tf32 and compile only mean something on CUDA."""
        cuda = device.startswith("cuda")
        w = settings.worker
        return cls(sdpa=w.sdpa, channels_last=w.channels_last and cuda, fuse_qkv=w.fuse_qkv, tf32=w.tf32 and cuda,
                   compile=w.compile)

    def names(self) -> list[str]:
        """The speed-ups in force, for /health."""
        return [name for name in ("sdpa", "channels_last", "fuse_qkv", "tf32", "compile") if getattr(self, name)]


def apply_process_wide(speedups: Speedups) -> None:
    """TF32 is a switch of the process, not of a model."""
    if speedups.tf32:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def apply_speedups(pipe: Any, speedups: Speedups) -> Any:
    """Apply the model-level speed-ups to a freshly loaded pipeline (once); returns it."""
    import torch

    unet = getattr(pipe, "unet", None)
    denoiser = unet if unet is not None else getattr(pipe, "transformer", None)
    if denoiser is None:
        return pipe
    # Transformer families (SD3, Flux) already run their own SDPA processors and are linear layers, not
    # convolutions: attention swaps and channels-last apply to a UNet (and every family's VAE).
    if not speedups.sdpa and unet is not None:
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    if speedups.channels_last:
        if unet is not None:
            unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if speedups.fuse_qkv and unet is not None:
        plain = unet.attn_processors
        pipe.fuse_qkv_projections()
        setattr(pipe, FUSED_ATTENTION, (plain, unet.attn_processors))
    if speedups.compile:
        denoiser.compile(fullgraph=False)   # dynamic=None: a second shape makes the batch dimension dynamic
    return pipe


def unfused_for_loras(pipe: Any) -> tuple[Any, Any] | None:
    """Switch a fused-QKV UNet to its plain attention (LoRA layers live on to_q/k/v); the pair to restore."""
    pair = getattr(pipe, FUSED_ATTENTION, None)
    if pair is not None:
        pipe.unet.set_attn_processor(dict(pair[0]))
    return pair


def refused(pipe: Any, pair: tuple[Any, Any] | None) -> None:
    """Back to the fused attention after a LoRA job (the fused weights were never dropped)."""
    if pair is not None:
        pipe.unet.set_attn_processor(dict(pair[1]))


def warm_up(pipe: Any, model: Any, max_batch: int) -> None:
    """Run the compiled denoiser once per batch size it will see most, at the model's default size,
    so the first jobs do not pay for compiling."""
    import torch

    size = model.request_defaults.width
    for images in sorted({1, max_batch}):
        log.info("compiling: warm-up at %dx%d, %d image(s) per call", size, size, images)
        pipe(prompt=[""] * images, width=size, height=size, num_inference_steps=2, output_type="latent",
             generator=[torch.Generator("cpu").manual_seed(0) for _ in range(images)])
