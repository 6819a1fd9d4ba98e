"""Run one canonical job on a warm pipeline and return its images.

Why small steps (as diffusers' own pipelines do): ask the pipeline's family
(worker/pipelines) for the view (txt2img/img2img/inpaint, scheduler) and the
call's arguments, apply LoRAs, encode the prompts as the job's syntax asks
(worker/conditioning.py), make one seeded generator per image, run, always
unload LoRAs. This part is the same for every family; views share the
base's weights, so a per-request scheduler never touches the shared pipe.
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from PIL import Image

from common.errors import JobCancelled, JobTimeLimit, ModelError, StaleAttempt
from common.jobspec import JobSpec, LoraRef
from worker.conditioning import EMBEDDING_NAMES, conditioned
from worker.inpaint import inpaint_inputs, paste_back
from worker.pipelines import family_of
from worker.speedups import refused, unfused_for_loras

log = logging.getLogger("sdqueue.worker")


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
    fused = unfused_for_loras(base)
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
        refused(base, fused)


def make_generators(seeds: list[int]) -> list[Any]:
    """One CPU generator per image: same seed, same pixels, on any device."""
    import torch

    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]


def generate(base: Any, spec: JobSpec, init_image: Image.Image | None, lora_files: dict[str, Path],
             on_step: Any, mask_image: Image.Image | None = None, refiner: Any = None,
             controlnet: tuple[list[Any], list[Image.Image | None]] | None = None,
             upscaler: Any = None) -> GenerationResult:
    """Run the job, batch by batch; exceptions from on_step (cancel, time limit) propagate unchanged.

    `on_step` is the step callback; if it has `begin_batch(index, count)`, it
    is told which batch runs, so progress spans the whole job. `refiner`: the
    warm pipeline of spec.refiner, which finishes each batch's denoising.
    A hires fix job runs its two passes in worker/hires.py. `controlnet`:
    the job's ControlNet models and each unit's image (None: the init image),
    for a job with spec.controlnet (worker/controlnet.py). `upscaler`: the
    warm ESRGAN-class network a hires fix job's upscaler names (worker/esrgan.py).
    """
    if spec.controlnet and (spec.hires or refiner is not None or controlnet is None):
        raise ModelError("ControlNet runs without the hires fix and the refiner pass, with its models loaded")
    if spec.hires:
        from worker.hires import generate_hires

        return generate_hires(base, spec, lora_files, on_step, upscaler)
    family = family_of(base)
    scheduler = family.make_scheduler(base, spec.scheduler, spec.scheduler_config)
    original = init_image
    if controlnet is not None:
        from worker.controlnet import control_images, control_kwargs, controlnet_view

        view = controlnet_view(base, family, spec, scheduler, controlnet[0])
    else:
        view = family.make_view(base, spec, scheduler)
    overlay = None
    if spec.mode == "inpaint" and init_image is not None and mask_image is not None:
        init_image, mask_image, overlay = inpaint_inputs(spec, init_image, mask_image)
    kwargs = family.build_call_kwargs(spec, init_image, mask_image)
    if controlnet is not None:
        kwargs.update(control_kwargs(spec, control_images(spec, controlnet[1], original)))
    images: list[Image.Image] = []
    seeds = spec.seeds
    batches = spec.batches
    if refiner is not None:     # both passes count on one scale: the job's steps, not each pass's own
        on_step = PassSteps(on_step, spec.num_inference_steps * len(batches))
        kwargs.update(denoising_end=spec.refiner_switch)
    kwargs.update(callback_on_step_end=on_step, output_type="pil" if refiner is None else "latent")
    with applied_loras(base, spec.loras, lora_files):
        kwargs = conditioned(base, spec, kwargs)     # after the LoRAs: they may adapt the text encoders
        for index, count in enumerate(batches):
            if hasattr(on_step, "begin_batch"):
                on_step.begin_batch(index, len(batches))
            batch_seeds = seeds[len(images):len(images) + count]
            output = view(**kwargs, num_images_per_prompt=count, generator=make_generators(batch_seeds))
            if refiner is None:
                images += list(output.images)
                continue
            require_steps(view, "the model", spec)
            images += refine(refiner, spec, output.images, batch_seeds, on_step)
    if overlay is not None:     # the web UI's overlay: unmasked pixels are the original's
        images = [paste_back(image, overlay) for image in images]
    return GenerationResult(images=images, seeds=seeds, scheduler=type(scheduler).__name__,
                            strength=kwargs.get("strength"))


class PassSteps:
    """The step callback of a base + refiner job: one running count over both passes and all batches.

    Why: each pass would report its own (step, total) (3 of 4, then 1 of 1),
    so progress and A1111's sampling_steps would jump; the job's steps are
    the scale (img2img strength may end it short of the total, and the job's
    end completes it).
    """

    def __init__(self, on_step: Any, total: int):
        self.on_step = on_step
        self.total = max(1, total)
        self.done = 0

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        self.done += 1
        if hasattr(self.on_step, "on_shared_step"):          # the worker's StepMonitor
            done = min(self.done, self.total)
            self.on_step.on_shared_step(done, self.total)
            offer = getattr(self.on_step, "offer_latents", None)     # previews, when the job asked for them
            if offer is not None:
                offer(pipe, tensors.get("latents"), done, self.total)
            return tensors
        return self.on_step(pipe, step, timestep, tensors)


def refine(refiner: Any, spec: JobSpec, latents: Any, seeds: list[int], on_step: Any) -> list[Image.Image]:
    """The SDXL refiner pass: img2img on the base's latents, from refiner_switch of the steps to the end.

    Why one prompt per image: the latents are already a batch; the refiner
    pairs them one to one (diffusers' base+refiner "ensemble of experts").
    """
    family = family_of(refiner)
    scheduler = family.make_scheduler(refiner, spec.scheduler, spec.scheduler_config)
    view = family.make_view(refiner, spec, scheduler, mode="img2img")
    # None as in the base pass: an SDXL model used as refiner encodes a missing negative prompt as zeros.
    prompts = per_image_prompts(refiner, spec, {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt or None},
                                len(seeds))
    output = view(**prompts, image=latents, num_inference_steps=spec.num_inference_steps,
                  denoising_start=spec.refiner_switch, guidance_scale=spec.guidance_scale,
                  generator=make_generators(seeds), callback_on_step_end=on_step, output_type="pil")
    require_steps(view, "the refiner", spec)
    return list(output.images)


def per_image_prompts(pipe: Any, spec: JobSpec, texts: dict[str, Any], count: int) -> dict[str, Any]:
    """A second pass's prompt arguments for `count` images already made (one latent or image each), encoded as
    the job's prompt syntax asks (`texts`: prompt, and negative_prompt when the family takes one)."""
    prompts = conditioned(pipe, spec, texts)
    if "prompt_embeds" in prompts:             # one conditioning, repeated for each image by the pipeline
        return {**prompts, "num_images_per_prompt": count}
    out = {**prompts, "prompt": [prompts["prompt"]] * count, "num_images_per_prompt": 1}
    if "negative_prompt" in prompts:
        out["negative_prompt"] = [prompts["negative_prompt"]] * count if prompts["negative_prompt"] else None
    return out


def require_steps(view: Any, which: str, spec: JobSpec) -> None:
    """A ModelError when one pass of a base + refiner job ran no denoising step (its images would be noise,
    or the untouched init image): the switch point and the steps leave it none."""
    if not getattr(view, "num_timesteps", 1):
        raise ModelError(f"{which} ran no denoising step with refiner_switch {spec.refiner_switch} of "
                         f"{spec.num_inference_steps} steps (strength {spec.strength}): use more steps or "
                         "move the switch")


# --- several jobs in one pipeline call -------------------------------------------------------
# Per image in a shared call (the texts, or their embeddings in A1111's syntax); the rest is shared.
VARYING_ARGUMENTS = ("prompt", "negative_prompt", "image", *EMBEDDING_NAMES)
DROPPING = (JobCancelled, JobTimeLimit, StaleAttempt)       # end one job of a shared call, not the call


@dataclass
class BatchMember:
    """One job of a shared pipeline call: its spec, its init image, and its own step check.

    `on_step(step, total)` records the job's progress and raises (cancel,
    time limit, stale attempt) to drop the job; its images are then
    discarded and the others go on. `result` is set when the call ends.
    """

    spec: JobSpec
    init_image: Image.Image | None
    on_step: Callable[[int, int], None]
    on_latents: Callable[[Any, Any, int, int], None] | None = None   # (pipe, its latents, step, total): previews
    result: GenerationResult | None = None
    dropped: BaseException | None = None
    call_kwargs: dict[str, Any] | None = None     # its own arguments, prompts encoded (set by generate_batch)

    @property
    def live(self) -> bool:
        return self.dropped is None


class SharedStep:
    """callback_on_step_end of a shared call: every live member's own progress, cancel and time limit.

    `waiting`: jobs of the same pick whose own call comes next (another
    prompt length, the other half after running out of memory). They are
    checked at every step too, at step 0: a cancel or time limit ends them
    while they wait, and the watchdog sees them alive, not stalled.
    """

    def __init__(self, members: list[BatchMember], on_drop: Callable[[BatchMember], None],
                 waiting: Sequence[BatchMember] = ()):
        self.members = members
        self.on_drop = on_drop
        self.waiting = waiting

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        total = int(getattr(pipe, "num_timesteps", 0) or 0)
        for member, done in [(m, step + 1) for m in self.members] + [(m, 0) for m in self.waiting]:
            if member.live:
                try:
                    member.on_step(done, total)
                except DROPPING as exc:
                    member.dropped = exc
                    self.on_drop(member)
        self.offer_latents(pipe, tensors.get("latents"), step + 1, total)
        if not any(member.live for member in self.members):
            raise self.members[-1].dropped    # nobody wants these images: stop denoising now
        return tensors


    def offer_latents(self, pipe: Any, latents: Any, step: int, total: int) -> None:
        """Each live member that wants previews gets its own images' slice of the call's latents."""
        if latents is None:
            return
        first = 0
        for member in self.members:          # the call's images are the members', in this order
            if member.live and member.on_latents is not None:
                member.on_latents(pipe, latents[first:first + member.spec.num_images], step, total)
            first += member.spec.num_images


def merged_call_kwargs(per_job: list[tuple[dict[str, Any], int]]) -> dict[str, Any]:
    """One call's arguments from each job's own (and its image count): per-image lists of what may differ,
    prompt embeddings stacked image by image (they are equally long: generate_batch groups them).

    When no job has a negative prompt it stays None, as a solo run passes it:
    SDXL encodes None as zeros (force_zeros_for_empty_prompt), not as the
    empty prompt (JobSpec.batch_key never mixes jobs with and without one).
    """
    merged = {name: value for name, value in per_job[0][0].items() if name not in VARYING_ARGUMENTS}
    for name in VARYING_ARGUMENTS:
        if name not in per_job[0][0]:
            continue
        values = [kwargs.get(name) for kwargs, count in per_job for _ in range(count)]
        if name in EMBEDDING_NAMES:
            import torch

            merged[name] = torch.cat(values)
        else:
            merged[name] = None if name == "negative_prompt" and not any(values) else \
                [blank_if_none(name, value) for value in values]
    return merged


def blank_if_none(name: str, value: Any) -> Any:
    """"" for a missing prompt or negative prompt (what diffusers uses for None), so one list holds them all."""
    return "" if value is None and name in ("prompt", "negative_prompt") else value


def generate_batch(base: Any, members: list[BatchMember], lora_files: dict[str, Path],
                   on_drop: Callable[[BatchMember], None] = lambda member: None,
                   fault: Callable[[int], None] | None = None) -> None:
    """Run compatible jobs (one JobSpec.batch_key) in one pipeline call; sets each live member's result.

    One seeded generator per image, so a job's images equal a solo run's (but
    for the ±1-level rounding batch size causes). Out of memory: the call is
    split in halves, and each half runs on its own. Exceptions other than a
    member's drop propagate (the worker fails or retries the whole batch);
    when every member was dropped, the last drop is raised. `fault(images)`
    runs before each call (tests inject an out-of-memory error with it).
    """
    family = family_of(base)
    first = members[0].spec
    scheduler = family.make_scheduler(base, first.scheduler, first.scheduler_config)
    view = family.make_view(base, first, scheduler)
    with applied_loras(base, first.loras, lora_files):
        for member in members:
            member.call_kwargs = conditioned(base, member.spec, family.build_call_kwargs(member.spec,
                                                                                         member.init_image, None))
        groups = same_length(members)
        for index, group in enumerate(groups):
            later = [member for waiting in groups[index + 1:] for member in waiting]
            run_shared(view, group, on_drop, type(scheduler).__name__, fault, later)
    for member in members:
        member.call_kwargs = None               # its prompt embeddings: not held while its images are uploaded
    if not any(m.live for m in members):
        raise members[-1].dropped               # nobody got images: the caller sees why


def same_length(members: list[BatchMember]) -> list[list[BatchMember]]:
    """The members by the length of their prompt embeddings (one group for plain prompts), in order of arrival.

    Why not pad them to one length as A1111 pads a batch: the empty chunks
    would change a short prompt's image; a job's images must not depend on
    the jobs it happens to share a call with. Jobs of another length run in
    a call of their own, one after the other.
    """
    groups: dict[int, list[BatchMember]] = {}
    for member in members:
        embeds = (member.call_kwargs or {}).get("prompt_embeds")
        groups.setdefault(0 if embeds is None else embeds.shape[1], []).append(member)
    return list(groups.values())


def run_shared(view: Any, members: list[BatchMember], on_drop: Callable[[BatchMember], None],
               scheduler_name: str, fault: Callable[[int], None] | None, waiting: Sequence[BatchMember] = ()) -> None:
    """One call for the live members, or two half calls when it runs out of memory; `waiting` (SharedStep)."""
    live = [m for m in members if m.live]
    if not live:
        return
    kwargs = merged_call_kwargs([(m.call_kwargs, m.spec.num_images) for m in live])
    seeds = [seed for m in live for seed in m.spec.seeds]
    kwargs.update(num_images_per_prompt=1, generator=make_generators(seeds), output_type="pil",
                  callback_on_step_end=SharedStep(live, on_drop, waiting))
    try:
        if fault is not None:
            fault(len(seeds))
        images = list(view(**kwargs).images)
    except DROPPING:
        if any(m.live for m in live):
            raise
        return                                  # every job of this call was dropped (and ended); the others go on
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here; the rest propagates
        if not is_out_of_memory(exc):
            raise
        if len(live) == 1:                      # one job alone does not fit: it fails, the others go on
            live[0].dropped = exc
            on_drop(live[0])
            return
        failure = exc
    else:
        for member in live:
            count = member.spec.num_images
            if member.live:
                member.result = GenerationResult(images=images[:count], seeds=member.spec.seeds,
                                                 scheduler=scheduler_name, strength=kwargs.get("strength"))
            images = images[count:]
        return
    # Outside the except block, so its traceback no longer pins the activations.
    log.warning("out of memory with %d images in one call (%s); running the jobs in two halves",
                len(seeds), type(failure).__name__)
    del failure
    release_memory()
    half = len(live) // 2
    run_shared(view, live[:half], on_drop, scheduler_name, fault, [*live[half:], *waiting])
    run_shared(view, live[half:], on_drop, scheduler_name, fault, waiting)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (and its MPS/XPU siblings), recognised without importing CUDA code."""
    return type(exc).__name__ == "OutOfMemoryError"


def release_memory() -> None:
    """Give cached accelerator memory back after an out-of-memory failure."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
