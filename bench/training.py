"""LoRA training on the CPU: steps/s of worker/training.train_lora, and what a checkpoint and a resume cost.

Why: a training job's speed is optimizer steps per second, and its
robustness rests on S3 checkpoints (worker/trainingjob.py). This runs the
trainer itself on dev/tinymodel's tiny SD 1.x pipeline (fp32, CPU), at 64²
and 128², batch 1 and 2, the configurations alternating `--rounds` times in
one run (so the ratios between them are measured side by side on a noisy
machine); then the cost of one checkpoint (state_to_bytes: its size and
time, state_from_bytes) against a step, and of a resume: the time from
train_lora's call to its first step, fresh against resumed.
The tiny model says nothing about GPU speed: `python -m bench.gpu` measures
LoRA training of full-size SD 1.5 and SDXL UNets there. `--count` prints the
arithmetic of docs/training.md instead (parameters, LoRA size, FLOPs and the
activations autograd keeps, counted on the meta device: no memory, no GPU).
Run: .venv/bin/python -m bench.training [--rounds 2] [--steps 12] [--threads 1] [--count]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = (64, 128)
BATCHES = (1, 2)
WARMUP_STEPS = 2          # steps left out of steps/s (the first ones allocate)
IMAGES = 4                # dataset size: two batches of 2 per epoch


# --- the tiny pipeline and data -------------------------------------------------------------------
def tiny_pipeline(folder: Path) -> Any:
    """dev/tinymodel's sdq-tiny, loaded as a worker loads it on the CPU (fp32)."""
    from common.catalog import find_model
    from dev.tinymodel import build_tiny_model
    from worker.pipelines import family_for

    build_tiny_model(folder / "sdq-tiny")
    model = find_model(folder, "sdq-tiny")
    return family_for(model).load(model, "cpu", None, "float32")


def examples(size: int) -> list[Any]:
    """IMAGES square gradients of `size` px with captions (one bucket: batches are full)."""
    from PIL import Image

    from worker.training import Example

    out = []
    for n in range(IMAGES):
        image = Image.new("RGB", (size, size))
        image.putdata([((x * 255) // size, (y * 255) // size, 60 * n) for y in range(size) for x in range(size)])
        out.append(Example(image, f"a gradient number {n}"))
    return out


def config(size: int, batch: int, steps: int, **kw: Any) -> Any:
    from worker.training import TrainingConfig

    return TrainingConfig(max_steps=steps, rank=8, resolution=size, batch_size=batch, seed=1, learning_rate=1e-3, **kw)


# --- measurements ---------------------------------------------------------------------------------
class StepClock:
    """train_lora's on_step: the time of each optimizer step, and of the first one since `start`."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.stamps.append(time.perf_counter())

    @property
    def to_first_step(self) -> float:
        return self.stamps[0] - self.start

    def steps_per_s(self, skip: int = WARMUP_STEPS) -> float:
        """1 / the median step time: robust to the odd step another process on a shared machine delays."""
        stamps = self.stamps[skip:]
        return 1 / statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def train_steps_per_s(pipe: Any, size: int, batch: int, steps: int) -> float:
    """Optimizer steps per second of one train_lora run (after WARMUP_STEPS)."""
    from worker.training import train_lora

    clock = StepClock()
    train_lora(pipe, examples(size), config(size, batch, steps + WARMUP_STEPS), on_step=clock)
    return clock.steps_per_s()


def checkpoint_cost(pipe: Any, size: int, steps: int) -> dict:
    """One checkpoint's bytes and the time to serialise and read it back, against a step; and the time to the
    first step of a fresh run and of a run resumed from that checkpoint (setup: data, encoding, UNet copy)."""
    from worker.training import state_from_bytes, state_to_bytes, train_lora

    states: list[Any] = []
    fresh = StepClock()
    train_lora(pipe, examples(size), config(size, 1, steps, checkpoint_every=steps // 2), on_step=fresh,
               save_state=states.append)
    started = time.perf_counter()
    data = state_to_bytes(states[0])
    to_bytes = time.perf_counter() - started
    started = time.perf_counter()
    state = state_from_bytes(data)
    from_bytes = time.perf_counter() - started
    resumed = StepClock()
    train_lora(pipe, examples(size), config(size, 1, steps, checkpoint_every=steps // 2), on_step=resumed,
               resume=state)
    step = 1 / fresh.steps_per_s()
    return {"bytes": len(data), "to_bytes_s": to_bytes, "from_bytes_s": from_bytes, "step_s": step,
            "fresh_first_step_s": fresh.to_first_step, "resumed_first_step_s": resumed.to_first_step,
            "resumed_at": state.step}


def run_bench(args: argparse.Namespace) -> None:
    """Steps/s per configuration (alternating rounds, medians), then checkpoint and resume costs."""
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="sdq-train-bench-") as tmp:
        pipe = tiny_pipeline(Path(tmp))
        train_steps_per_s(pipe, SIZES[0], 1, 2)                            # warm-up (first-call allocations)
        rates: dict[tuple[int, int], list[float]] = {(s, b): [] for s in SIZES for b in BATCHES}
        for _ in range(args.rounds):
            for size, batch in rates:
                rates[(size, batch)].append(train_steps_per_s(pipe, size, batch, args.steps))
        cost = checkpoint_cost(pipe, SIZES[-1], max(args.steps, 8))
    base = statistics.median(rates[(SIZES[0], 1)])
    print(f"LoRA training, tiny SD 1.x (fp32, CPU, torch {torch.get_num_threads()} threads), rank 8, "
          f"{args.steps} steps after {WARMUP_STEPS} warm-up, median of {args.rounds} alternating rounds:")
    for (size, batch), values in rates.items():
        median = statistics.median(values)
        print(f"  {size:>3}² batch {batch}: {median:6.1f} steps/s  {median * batch:6.1f} images/s  "
              f"{median / base:5.2f} x 64² batch 1   (rounds: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"checkpoint at {SIZES[-1]}², rank 8: {cost['bytes'] / 1e6:.2f} MB; state_to_bytes "
          f"{1000 * cost['to_bytes_s']:.1f} ms, state_from_bytes {1000 * cost['from_bytes_s']:.1f} ms "
          f"({cost['to_bytes_s'] / cost['step_s']:.2f} x a step of {1000 * cost['step_s']:.1f} ms; the S3 upload "
          f"comes on top)")
    print(f"to the first step: fresh {cost['fresh_first_step_s']:.2f} s, resumed from step {cost['resumed_at']} "
          f"{cost['resumed_first_step_s']:.2f} s ({cost['resumed_first_step_s'] / cost['fresh_first_step_s']:.2f} x)")


# --- the arithmetic of docs/training.md (meta device) ---------------------------------------------
class FusedAttentionStandIn:
    """What a fused SDPA kernel (flash / memory-efficient, as CUDA runs fp16 attention) keeps for backward:
    q, k, v, the output and a (batch, heads, tokens) fp32 log-sum-exp; never the attention matrix that
    the math path (meta tensors, CPU fallback) keeps."""

    @staticmethod
    def make() -> Callable[..., Any]:
        import torch

        class Fused(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, q: Any, k: Any, v: Any) -> Any:
                out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
                ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
                return out

            @staticmethod
            def backward(ctx: Any, grad: Any) -> Any:
                q, k, v, _, _ = ctx.saved_tensors
                return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

        return lambda q, k, v, *args, **kwargs: Fused.apply(q, k, v)


def meta_unet_with_lora(arch: str, rank: int) -> Any:
    """The full-size UNet on the meta device in fp16 with worker/training.py's LoRA (fp32) added."""
    import torch

    from bench.gpu import UNETS
    from worker.training import TrainingConfig, add_lora

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("meta"):
            unet = UNETS[arch](False)
    finally:
        torch.set_default_dtype(previous)
    add_lora(unet, TrainingConfig(max_steps=1, rank=rank))
    return unet


def count_step(unet: Any, size: int, batch: int) -> dict:
    """FLOPs of one training step's forward and backward, and the bytes of the activations autograd keeps
    (tensors saved for backward, each storage once, weights left out)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    weights = {id(p) for p in unet.parameters()}
    saved: dict[int, int] = {}
    keep: list[Any] = []

    def pack(t: Any) -> Any:
        base = t._base if t._base is not None else t
        if id(base) not in weights and id(base) not in saved:
            saved[id(base)] = base.numel() * base.element_size()
            keep.append(base)                                   # ids stay unique while counting
        return t

    conf = unet.config
    latents = torch.randn(batch, 4, size // 8, size // 8, device="meta", dtype=torch.float16)
    context = torch.randn(batch, 77, conf.cross_attention_dim, device="meta", dtype=torch.float16)
    extra = {}
    if conf.addition_embed_type == "text_time":
        pooled = conf.projection_class_embeddings_input_dim - 6 * conf.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, device="meta", dtype=torch.float16),
                                       "time_ids": torch.randn(batch, 6, device="meta", dtype=torch.float16)}}
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = unet(latents, torch.full((batch,), 500, device="meta"), context, return_dict=False, **extra)[0]
        forward = counter.get_total_flops()
        out.float().pow(2).mean().backward()
    return {"forward_flops": forward, "backward_flops": counter.get_total_flops() - forward,
            "saved_bytes": sum(saved.values())}


def run_count(args: argparse.Namespace) -> None:
    """docs/training.md's figures: parameters, LoRA parameters per rank, FLOPs and kept activations."""
    import torch.nn.functional as F

    from worker.training import TARGET_MODULES

    sizes = {"sd15": 512, "sdxl": 1024}
    for arch, size in sizes.items():
        unet = meta_unet_with_lora(arch, args.rank)
        base = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
        lora = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        layers = sum(1 for m in unet.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
        print(f"{arch}: UNet {base / 1e6:.1f} M parameters; LoRA rank {args.rank} on {', '.join(TARGET_MODULES)}: "
              f"{lora / 1e6:.3f} M parameters ({layers} layers)")
        for batch in (1, 2):
            math = count_step(unet, size, batch)
            original = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = FusedAttentionStandIn.make()
            try:
                fused = count_step(unet, size, batch)
            finally:
                F.scaled_dot_product_attention = original
            print(f"  {size}² batch {batch}: forward {math['forward_flops'] / 1e9:.0f} GFLOP, backward "
                  f"{math['backward_flops'] / 1e9:.0f} GFLOP ({math['backward_flops'] / math['forward_flops']:.2f} x); "
                  f"activations kept for backward: {fused['saved_bytes'] / 1e9:.2f} GB with fused attention, "
                  f"{math['saved_bytes'] / 1e9:.2f} GB with the math path")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="measured steps per run (after the warm-up ones)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least disturbed by neighbours)")
    parser.add_argument("--count", action="store_true", help="print docs/training.md's arithmetic instead")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank for --count")
    args = parser.parse_args()
    from worker.quiet import quiet_libraries

    quiet_libraries()
    (run_count if args.count else run_bench)(args)


if __name__ == "__main__":
    main()
