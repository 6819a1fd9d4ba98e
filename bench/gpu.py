"""The GPU benchmark: FLOP limit, plain diffusers, and sdqueue through the real stack, in one run.

For a machine with one NVIDIA GPU and no internet (under 8 minutes):
1. builds random-weight pipelines with the real SD-1.5 and SDXL
   architectures from their configs (no download) and saves them as
   diffusers folders (fp16), which the worker loads like any checkpoint;
2. prints each one's FLOP limit: UNet FLOPs per denoising step
   (torch.utils.flop_counter, classifier-free guidance = 2 rows) against the
   GPU's dense fp16 peak (the spec figure for known cards, and a measured
   large-matmul rate), i.e. the most steps per second the card allows;
3. runs plain diffusers fp16 at batch 1 (it/s of the denoising loop, and
   images/s for whole 30-step calls);
4. trains a LoRA (rank 8, batch 1, mixed precision fp16) on each UNet
   through worker/training.train_lora, as a training job does (its own copy
   of the UNet, the warm pipeline untouched): optimizer steps/s at the
   family's native size, and peak GPU memory (torch.cuda.max_memory_allocated,
   the warm pipeline included) against docs/training.md's arithmetic;
5. runs sdqueue through the real stack (Redis, S3, API, one GPU worker with
   its defaults: fp16, max_batch 8) for 30-step 512² SD-1.5 jobs at
   concurrency 1 and 8 (client threads submitting and waiting in turn).
Targets: concurrency 1 within 10 % of plain diffusers' images/s;
concurrency 8 >= 2x plain diffusers' batch-1 images/s.

`--tiny` runs the same steps on the CPU with tiny architectures in about a
minute (CI runs it, so the script is known to work before a GPU is lent).
Figures go to stdout and to bench/out/gpu.json (and $OUT/gpu.json if set).
Run: .venv/bin/python -m bench.gpu [--tiny] [--jobs 8] [--archs sd15,sdxl]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import BENCH_KEY, bench_stack, percentile  # noqa: E402

# Dense fp16/bf16 tensor-core peaks from the vendors' data sheets (no sparsity), by device name fragment.
SPEC_PEAKS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12,
              "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12,
              "V100": 125e12, "T4": 65e12}
OUT_DIR = Path(__file__).resolve().parent / "out"
# A LoRA training step's backward over its forward, counted for a frozen UNet with LoRA on the attention
# projections (python -m bench.training --count: 1.08-1.13; only input gradients flow through frozen layers).
TRAINING_BACKWARD_RATIO = 1.1
TRAINING_WARMUP = 3       # optimizer steps left out of steps/s (allocations, autotuning)


# --- architectures -------------------------------------------------------------------------
def clip_config(tokenizer: Any, hidden: int, layers: int, heads: int, intermediate: int, projection: int,
                act: str, vocab: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, hidden_size=hidden, intermediate_size=intermediate,
                          num_attention_heads=heads, num_hidden_layers=layers, vocab_size=vocab,
                          max_position_embeddings=77, projection_dim=projection, hidden_act=act)


def vae(tiny: bool) -> Any:
    from diffusers import AutoencoderKL

    channels = (16, 32, 32, 32) if tiny else (128, 256, 512, 512)
    return AutoencoderKL(block_out_channels=channels, in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1 if tiny else 2, norm_num_groups=16 if tiny else 32,
                         sample_size=128 if tiny else 512)


def sd15_unet(tiny: bool) -> Any:
    """SD 1.x's UNet (860M; diffusers' defaults are its config) or dev/tinymodel's tiny one, in the default
    dtype on the default device (bench/training.py builds it on the meta device to count it)."""
    from diffusers import UNet2DConditionModel

    if tiny:
        return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                                    cross_attention_dim=32, attention_head_dim=8,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)


def sdxl_unet(tiny: bool) -> Any:
    """SDXL base's UNet (2.57B) or a tiny one with the same block types and size conditioning."""
    from diffusers import UNet2DConditionModel

    if tiny:
        return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=16,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                    projection_class_embeddings_input_dim=80, cross_attention_dim=64)
    return UNet2DConditionModel(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                                cross_attention_dim=2048, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=256,
                                projection_class_embeddings_input_dim=2816)


UNETS: dict[str, Callable[[bool], Any]] = {"sd15": sd15_unet, "sdxl": sdxl_unet}


def build_sd15(tokenizer: Any, tiny: bool) -> Any:
    """SD-1.5's architecture (UNet 860M, VAE 84M, CLIP ViT-L text 123M), or dev/tinymodel's tiny one."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    unet = sd15_unet(tiny)
    if tiny:
        text = clip_config(tokenizer, 32, 2, 4, 37, 32, "quick_gelu", len(tokenizer))
    else:
        text = clip_config(tokenizer, 768, 12, 12, 3072, 768, "quick_gelu", 49408)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae(tiny), text_encoder=CLIPTextModel(text), tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_sdxl(tokenizer: Any, tiny: bool) -> Any:
    """SDXL base's architecture (UNet 2.6B, two text encoders: CLIP ViT-L and OpenCLIP bigG), or a tiny one."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = sdxl_unet(tiny)
    if tiny:
        first = clip_config(tokenizer, 32, 2, 4, 37, 32, "gelu", len(tokenizer))
        second = clip_config(tokenizer, 32, 2, 4, 37, 32, "gelu", len(tokenizer))
    else:
        first = clip_config(tokenizer, 768, 12, 12, 3072, 768, "quick_gelu", 49408)
        second = clip_config(tokenizer, 1280, 32, 20, 5120, 1280, "gelu", 49408)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae(tiny), text_encoder=CLIPTextModel(first),
                                     text_encoder_2=CLIPTextModelWithProjection(second), tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)


BUILDERS: dict[str, Callable[[Any, bool], Any]] = {"sd15": build_sd15, "sdxl": build_sdxl}


def build(arch: str, folder: Path, device: str, dtype: Any, tiny: bool) -> Any:
    """Random weights in `dtype`, created on `device` (fast on a GPU), saved as a diffusers folder."""
    import torch
    from transformers import CLIPTokenizer

    from dev.tinymodel import write_tokenizer_files

    write_tokenizer_files(folder / "_tok")
    tokenizer = CLIPTokenizer(str(folder / "_tok" / "vocab.json"), str(folder / "_tok" / "merges.txt"),
                              model_max_length=77, pad_token="<|endoftext|>")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            pipe = BUILDERS[arch](tokenizer, tiny)
    finally:
        torch.set_default_dtype(previous)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / arch, safe_serialization=True)
    shutil.rmtree(folder / "_tok", ignore_errors=True)
    return pipe


# --- figures -------------------------------------------------------------------------------
def unet_flops_per_step(pipe: Any, size: int, device: str, dtype: Any) -> float:
    """FLOPs of one denoising step: a UNet forward on 2 rows (classifier-free guidance)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    latents = torch.randn(2, 4, size // 8, size // 8, device=device, dtype=dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, device=device, dtype=dtype),
                                       "time_ids": torch.randn(2, 6, device=device, dtype=dtype)}}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(latents, torch.tensor([500] * 2, device=device), encoder_hidden_states=context, **extra)
    return float(counter.get_total_flops())


def measured_peak(device: str, dtype: Any) -> float:
    """FLOP/s of a large matmul: what the card really sustains in this precision."""
    import torch

    n, rounds = (8192, 20) if device.startswith("cuda") else (512, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(rounds):
        a @ b
    synchronize(device)
    return 2 * n ** 3 * rounds / (time.perf_counter() - started)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def spec_peak(device: str) -> tuple[str, float | None]:
    """The card's name and its data-sheet dense fp16 peak, if known."""
    if not device.startswith("cuda"):
        return "cpu", None
    import torch

    name = torch.cuda.get_device_name(0)
    return name, next((peak for key, peak in SPEC_PEAKS.items() if key in name), None)


def plain_diffusers(pipe: Any, size: int, steps: int, device: str, calls: int = 3) -> dict:
    """Batch-1 calls of the pipeline itself: denoising it/s and whole-call images/s (after a warm-up)."""
    import torch

    stamps: list[float] = []

    def on_step(p, i, t, tensors):
        synchronize(device)
        stamps.append(time.perf_counter())
        return tensors

    pipe(prompt="a lighthouse at dusk", width=size, height=size, num_inference_steps=2)        # warm-up
    its, seconds = [], []
    for n in range(calls):
        stamps.clear()
        synchronize(device)
        started = time.perf_counter()
        pipe(prompt="a lighthouse at dusk", width=size, height=size, num_inference_steps=steps,
             generator=torch.Generator("cpu").manual_seed(n), callback_on_step_end=on_step)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
        its.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"it_per_s": statistics.median(its), "seconds_per_image": statistics.median(seconds),
            "images_per_s": 1 / statistics.median(seconds)}


def preview_cost(pipe: Any, size: int, steps: int, device: str, calls: int = 3) -> dict:
    """Seconds per call with a preview made at every step (worker/previews.py: projection, GPU->CPU copy and
    encoding, all on the step path here: the worst case) against none, same calls; and the preview's dtype path."""
    import torch

    from worker.previews import Previewer, encode_preview

    previewer, made = Previewer(1, size, size), []

    def on_step(p, i, t, tensors):
        made.append(encode_preview(previewer.render(p, tensors["latents"], i + 1, steps), 256, "jpeg"))
        return tensors

    def timed(callback: Any) -> float:
        seconds = []
        for n in range(calls):
            synchronize(device)
            started = time.perf_counter()
            pipe(prompt="a lighthouse at dusk", width=size, height=size, num_inference_steps=steps,
                 generator=torch.Generator("cpu").manual_seed(n), callback_on_step_end=callback)
            synchronize(device)
            seconds.append(time.perf_counter() - started)
        return statistics.median(seconds)

    plain, with_previews = timed(None), timed(on_step)
    return {"seconds_plain": plain, "seconds_previews": with_previews, "ratio": with_previews / plain,
            "previews": len(made), "preview_bytes": len(made[-1].image) if made else 0}


def training_examples(size: int, count: int = 4) -> list[Any]:
    """A small dataset at the training size: plain images with captions (speed does not depend on content)."""
    from PIL import Image

    from worker.training import Example

    return [Example(Image.new("RGB", (size, size), (60 * n, 120, 200 - 40 * n)), f"a photo of sks number {n}")
            for n in range(count)]


def training_speed(pipe: Any, size: int, device: str, steps: int, forward_flops: float, peak: float | None,
                   rank: int = 8, batch: int = 1) -> dict:
    """LoRA training through worker/training.train_lora, as a training job runs it: optimizer steps/s (median
    step after TRAINING_WARMUP), peak memory (torch.cuda.max_memory_allocated, the warm pipeline included; an
    out-of-memory is reported, not raised) and the estimated share of the card's FLOP peak."""
    import torch

    from worker.training import TrainingConfig, train_lora

    cuda = device.startswith("cuda")
    stamps: list[float] = []

    def on_step(step: int, total: int, loss: float) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    config = TrainingConfig(max_steps=steps + TRAINING_WARMUP, rank=rank, resolution=size, batch_size=batch,
                            mixed_precision="fp16" if cuda else "no", seed=1)
    if cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated() if cuda else None
    figures: dict[str, Any] = {"size": size, "rank": rank, "batch": batch, "mixed_precision": config.mixed_precision,
                               "weights_bytes": weights}
    try:
        train_lora(pipe, training_examples(size, max(4, batch)), config, on_step=on_step)
    except torch.cuda.OutOfMemoryError as exc:
        figures["error"] = f"out of memory: {exc}".splitlines()[0]
        return figures
    finally:
        if cuda:
            figures["peak_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.empty_cache()
    step = statistics.median(b - a for a, b in zip(stamps[TRAINING_WARMUP:], stamps[TRAINING_WARMUP + 1:]))
    step_flops = forward_flops * batch * (1 + TRAINING_BACKWARD_RATIO)
    figures.update({"steps_per_s": 1 / step, "images_per_s": batch / step, "step_flops_est": step_flops,
                    "flop_utilisation_est": step_flops / step / peak if peak else None})
    return figures


def report_training(arch: str, figures: dict) -> str:
    """One line for the training figures."""
    head = f"  LoRA training {figures['size']}² rank {figures['rank']} batch {figures['batch']} " \
           f"({figures['mixed_precision']}): "
    gib = 2 ** 30
    memory = ""
    if figures.get("peak_bytes") is not None:
        memory = f", peak memory {figures['peak_bytes'] / gib:.2f} GiB ({figures['weights_bytes'] / gib:.2f} GiB " \
                 f"warm pipeline + {(figures['peak_bytes'] - figures['weights_bytes']) / gib:.2f} GiB training)"
    if "error" in figures:
        return head + figures["error"] + memory
    share = figures.get("flop_utilisation_est")
    return head + f"{figures['steps_per_s']:.2f} steps/s" + memory + \
        (f"; ~{100 * share:.0f} % of the FLOP peak (est.)" if share else "")


def through_stack(models_dir: Path, model: str, size: int, steps: int, jobs: int, tiny: bool) -> dict:
    """sdqueue's images/s for `jobs` jobs per client at concurrency 1 and 8 (one GPU worker, defaults)."""
    import requests

    env = {"SDQ_MODELS_DIR": str(models_dir), "SDQ_MODELS_DEFAULT": model, "SDQ_LIMITS_MAX_SIZE": str(max(size, 1024)),
           "SDQ_TASKS_PROGRESS_INTERVAL": "0.2"}
    if tiny:
        env.update({"SDQ_WORKER_MAX_BATCH": "8", "SDQ_WORKER_TORCH_THREADS": "2"})
    body = {"prompt": "a lighthouse at dusk", "width": size, "height": size, "num_inference_steps": steps}
    figures = {}
    with bench_stack(worker=True, env=env) as stack:
        session = requests.Session()
        session.headers["X-API-Key"] = BENCH_KEY
        run_clients(stack.api_url, session, body, clients=1, jobs=2)                      # warm-up
        for clients in (1, 8):
            figures[f"concurrency_{clients}"] = run_clients(stack.api_url, session, body, clients, jobs)
        health = session.get(stack.api_url + "/health", timeout=10).json()
        figures["worker"] = next((w for w in health["workers"] if w["models"]), {})
    return figures


def run_clients(base: str, session: Any, body: dict, clients: int, jobs: int) -> dict:
    """`clients` threads, each submitting a job and waiting for it (long poll), `jobs` times."""
    import requests

    latencies: list[float] = []
    errors: list[str] = []

    def client(n: int) -> None:
        own = requests.Session()
        own.headers.update(session.headers)
        for j in range(jobs):
            started = time.perf_counter()
            task = own.post(base + "/api/v1/generate", json={**body, "seed": 1000 * n + j}, timeout=60).json()
            while True:
                state = own.get(f"{base}/api/v1/tasks/{task['task_id']}?wait=30", timeout=90).json()
                if state["status"] in ("completed", "failed", "cancelled"):
                    break
            if state["status"] != "completed":
                errors.append(state.get("error_message") or state["status"])
            latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} jobs did not complete: {errors[:3]}")
    return {"clients": clients, "jobs": len(latencies), "seconds": elapsed, "images_per_s": len(latencies) / elapsed,
            "latency_p50": percentile(latencies, 50), "latency_p95": percentile(latencies, 95)}


# --- the run -------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny architectures on the CPU (CI proves the script)")
    parser.add_argument("--archs", default="sd15,sdxl")
    parser.add_argument("--jobs", type=int, default=0, help="jobs per client (default 8; 2 with --tiny)")
    parser.add_argument("--steps", type=int, default=0, help="denoising steps (default 30; 4 with --tiny)")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="measured LoRA training steps per arch (default 20; 4 with --tiny); 0 with --no-training")
    parser.add_argument("--no-training", action="store_true", help="leave out the LoRA training figures")
    args = parser.parse_args()
    from worker.quiet import quiet_libraries

    quiet_libraries()
    import torch

    device = "cpu" if args.tiny else "cuda"
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --tiny to check the script on the CPU")
    dtype = torch.float32 if args.tiny else torch.float16
    steps = args.steps or (4 if args.tiny else 30)
    jobs = args.jobs or (2 if args.tiny else 8)
    train_steps = args.train_steps or (4 if args.tiny else 20)
    sizes = {"sd15": 64 if args.tiny else 512, "sdxl": 64 if args.tiny else 1024}
    name, peak = spec_peak(device)
    measured = measured_peak(device, dtype)
    report: dict[str, Any] = {"device": name, "dtype": str(dtype).removeprefix("torch."), "steps": steps,
                              "spec_peak_flops": peak, "measured_matmul_flops": measured, "archs": {}}
    print(f"device: {name}   dtype {report['dtype']}   matmul {measured / 1e12:.2f} TFLOP/s measured"
          + (f", {peak / 1e12:.0f} TFLOP/s data sheet" if peak else ""), flush=True)
    with tempfile.TemporaryDirectory(prefix="sdq-gpu-bench-") as tmp:
        models = Path(tmp) / "models"
        for arch in args.archs.split(","):
            size = sizes[arch]
            started = time.perf_counter()
            pipe = build(arch, models, device, dtype, args.tiny)
            built = time.perf_counter() - started
            flops = unet_flops_per_step(pipe, size, device, dtype)
            limit = (peak or measured) / flops
            plain = plain_diffusers(pipe, size, steps, device)
            previews = preview_cost(pipe, size, steps, device)
            figures = {"size": size, "build_seconds": built, "unet_flops_per_step": flops,
                       "flop_limit_it_per_s": limit, "plain": plain, "previews": previews}
            if not args.no_training:       # flops counts 2 rows (CFG): a training row is half of it
                figures["training"] = training_speed(pipe, size, device, train_steps, flops / 2, peak or measured)
            print(f"{arch} {size}x{size}: UNet {flops / 1e9:.1f} GFLOP per step (CFG 2 rows) -> FLOP limit "
                  f"{limit:.1f} it/s; plain diffusers batch 1: {plain['it_per_s']:.1f} it/s "
                  f"({100 * plain['it_per_s'] / limit:.0f} % of the limit), {plain['images_per_s']:.2f} images/s "
                  f"for {steps}-step calls", flush=True)
            print(f"  a preview at every step: {previews['ratio']:.3f} x the call time "
                  f"({previews['previews']} previews, {previews['preview_bytes']} bytes as a data URL; target <= 1.05)",
                  flush=True)
            if "training" in figures:
                print(report_training(arch, figures["training"]), flush=True)
            del pipe
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            report["archs"][arch] = figures
        if "sd15" in report["archs"]:
            stack = through_stack(models, "sd15", sizes["sd15"], steps, jobs, args.tiny)
            report["stack"] = stack
            plain = report["archs"]["sd15"]["plain"]["images_per_s"]
            one, eight = stack["concurrency_1"], stack["concurrency_8"]
            report["targets"] = {"c1_vs_plain": one["images_per_s"] / plain, "c8_vs_plain": eight["images_per_s"] / plain}
            worker = stack.get("worker", {})
            print(f"sdqueue sd15 {sizes['sd15']}x{sizes['sd15']}, {steps} steps (worker: {worker.get('device')}, "
                  f"{worker.get('dtype')}, max_batch {worker.get('max_batch')}, speed-ups {worker.get('speedups')}):")
            for label, run in (("concurrency 1", one), ("concurrency 8", eight)):
                print(f"  {label}: {run['images_per_s']:.2f} images/s ({run['jobs']} jobs, {run['seconds']:.1f} s), "
                      f"latency p50 {run['latency_p50']:.2f} s p95 {run['latency_p95']:.2f} s", flush=True)
            c1, c8 = report["targets"]["c1_vs_plain"], report["targets"]["c8_vs_plain"]
            met = c1 >= 0.9 and c8 >= 2.0
            print(f"concurrency 1 / plain: {c1:.2f} (target >= 0.90); concurrency 8 / plain batch 1: {c8:.2f} "
                  f"(target >= 2.0)")
            print(f"gpu targets: {'MET' if met else 'MISSED'}{' (tiny CPU run: targets are for a GPU)' if args.tiny else ''}")
    write_report(report)


def write_report(report: dict) -> None:
    text = json.dumps(report, indent=2, default=str)
    for folder in filter(None, (OUT_DIR, os.environ.get("OUT"))):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "gpu.json").write_text(text)


if __name__ == "__main__":
    main()
