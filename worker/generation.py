"""Run one canonical job on a warm pipeline and return its images.

Why small steps (as diffusers' own pipelines do): ask the pipeline's family
(worker/pipelines) for the view (txt2img/img2img/inpaint, scheduler) and the
call's arguments, apply LoRAs, make one seeded generator per image, run,
always unload LoRAs. This part is the same for every family; views share
the base's weights, so a per-request scheduler never touches the shared pipe.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from common.errors import ModelError
from common.jobspec import JobSpec, LoraRef
from worker.pipelines import family_of


@dataclass
class GenerationResult:
    """Images in seed order, and what actually ran."""

    images: list[Image.Image]
    seeds: list[int]
    scheduler: str
    strength: float | None


def adapter_name(index: int, lora: LoraRef) -> str:
    return f"sdq{index}_" + re.sub(r"[^A-Za-z0-9_]", "_", lora.name)


@contextlib.contextmanager
def applied_loras(base: Any, loras: list[LoraRef], lora_files: dict[str, Path]) -> Iterator[None]:
    """Load and weight the job's LoRAs on the shared UNet; always unload them after."""
    if not loras:
        yield
        return
    try:
        names = []
        for i, lora in enumerate(loras):
            path = lora_files.get(lora.name)
            if path is None:
                raise ModelError(f"LoRA '{lora.name}' is not in the LoRA directory")
            name = adapter_name(i, lora)
            base.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
            names.append(name)
        base.set_adapters(names, adapter_weights=[lr.weight for lr in loras])
        yield
    finally:
        base.unload_lora_weights()


def make_generators(seeds: list[int]) -> list[Any]:
    """One CPU generator per image: same seed, same pixels, on any device."""
    import torch

    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]


def generate(base: Any, spec: JobSpec, init_image: Image.Image | None, lora_files: dict[str, Path],
             on_step: Any, mask_image: Image.Image | None = None) -> GenerationResult:
    """Run the job, batch by batch; exceptions from on_step (cancel, time limit) propagate unchanged.

    `on_step` is the step callback; if it has `begin_batch(index, count)`, it
    is told which batch runs, so progress spans the whole job.
    """
    family = family_of(base)
    scheduler = family.make_scheduler(base, spec.scheduler, spec.scheduler_config)
    view = family.make_view(base, spec, scheduler)
    kwargs = family.build_call_kwargs(spec, init_image, mask_image)
    kwargs.update(callback_on_step_end=on_step, output_type="pil")
    images: list[Image.Image] = []
    seeds = spec.seeds
    batches = spec.batches
    with applied_loras(base, spec.loras, lora_files):
        for index, count in enumerate(batches):
            if hasattr(on_step, "begin_batch"):
                on_step.begin_batch(index, len(batches))
            batch_seeds = seeds[len(images):len(images) + count]
            output = view(**kwargs, num_images_per_prompt=count, generator=make_generators(batch_seeds))
            images += list(output.images)
    return GenerationResult(images=images, seeds=seeds, scheduler=type(scheduler).__name__,
                            strength=kwargs.get("strength"))
