"""The canonical job: what every API dialect translates its request into.

Why: generation is implemented once. A dialect validates its own request
shape, then builds a complete JobSpec (defaults filled, seed chosen, init
image already in S3) that the worker runs without consulting any dialect.
"""
from __future__ import annotations

import hashlib
import json

import orjson
from dataclasses import dataclass, field, fields
from typing import Any


_OMIT_WHEN_EMPTY = frozenset({"scheduler_config", "sampler_name", "batch_size", "mask_image_key", "output_prefix",
                              "save_copy_dir", "meta", "assets", "output_stem", "sidecar_key", "refiner",
                              "refiner_switch", "family", "inpaint_fill", "inpaint_area", "prompt_syntax",
                              "hires", "controlnet", "extras", "preview_every", "callback_events",
                              "training", "time_limit", "max_attempts", "merge"})


ZERO_NEGATIVE_FAMILIES = (None, "sdxl", "sdxl-refiner")   # a missing negative prompt is zeros, not ""


@dataclass
class LoraRef:
    """A LoRA file from the LoRA directory and the weight it is applied with."""

    name: str
    weight: float = 1.0


@dataclass
class JobSpec:
    """Everything a worker needs to produce a job's images; plain values only."""

    prompt: str
    model: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    negative_prompt: str | None = None
    num_images: int = 1
    strength: float | None = None
    scheduler: str | None = None
    output_format: str = "png"
    init_image_key: str | None = None
    loras: list[LoraRef] = field(default_factory=list)
    callback_url: str | None = None
    dialect: str = "native"
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    sampler_name: str | None = None
    batch_size: int | None = None
    mask_image_key: str | None = None
    output_prefix: str | None = None
    save_copy_dir: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Files the worker copies from S3 into its model/LoRA directory first: [{"key", "dir", "name"}]
    assets: list[dict[str, str]] = field(default_factory=list)
    output_stem: str | None = None   # outputs are {output_prefix}/{stem}{n}.{ext}
    sidecar_key: str | None = None   # where the worker writes meta["sidecar"] + generation info as JSON
    priority: str = "normal"         # high | normal | low: the order workers take pending jobs in
    refiner: str | None = None       # an SDXL model that finishes the denoising (the SDXL refiner pass)
    refiner_switch: float | None = None   # fraction of the steps the base runs before the refiner takes over
    family: str | None = None        # the model's family when the job was made (common/families.py)
    inpaint_fill: str | None = None  # inpainting's masked area starts as the original ("original") or "fill"
    inpaint_area: list[int] | None = None   # inpaint only this box of the init image (x1, y1, x2, y2), at full size
    prompt_syntax: str | None = None   # "a1111": emphasis, BREAK, long prompts (common/promptsyntax.py); None: plain
    # The hires fix (txt2img): upscaler, upscale_width/_height, width/height (the output), steps (0: the job's),
    # strength, and optionally prompt, negative_prompt, scheduler, scheduler_config, sampler_name, scale, resize
    hires: dict[str, Any] | None = None
    # ControlNet units (MultiControlNet when several), each {"model", "image_key" (None: the init image),
    # "scale", "start", "end", "preprocessor" (none | canny), "low", "high", "processor_res", "resize_mode",
    # "guess_mode"}; see api/controlnet.py and worker/controlnet.py
    controlnet: list[dict[str, Any]] | None = None
    # The A1111 extras with a model upscaler (api/dialects/a1111/extras.py, worker/extras.py): the request's fields
    # (common/extras.py FIELDS) and "image_keys", its images under the task's input prefix; no diffusion runs
    extras: dict[str, Any] | None = None
    preview_every: int = 0           # a preview of the latents every this many steps (worker/previews.py); 0: none
    callback_events: list[str] | None = None   # the events the webhook gets (docs/events.md); None: the final ones
    # A LoRA training job (api/trainings.py, worker/trainingjob.py): its hyper-parameters ("config", the fields of
    # worker.training.TrainingConfig), "examples" [{"key", "caption"}] from an Enabled dataset, "dataset",
    # "lora_name", "state_key" (its resumable checkpoint in S3); `model` is the base model. No images are made.
    training: dict[str, Any] | None = None
    time_limit: int = 0              # seconds this job may run (0: tasks.time_limit); training sets its own
    max_attempts: int = 0            # workers that may die running it before it fails (0: tasks.max_attempts)
    # A model merge (api/merges.py, worker/mergejob.py): "inputs" [{"role" (primary | secondary | tertiary), "name"
    # (as the client named it), "source" (catalog | checkpoint), "model" (a catalog model's name), "asset" (the key's
    # checkpoint file to fetch)}], "method" (weighted_sum | add_difference), "multiplier", "dtype" (keep | float16 |
    # bfloat16 | float32), "file" (the output's file name), "family". No images are made.
    merge: dict[str, Any] | None = None

    @property
    def mode(self) -> str:
        """txt2img; img2img when an init image was given; inpaint when a mask came with it; extras (no diffusion);
        train (a LoRA training job); merge (a model merge)."""
        if self.extras:
            return "extras"
        if self.training:
            return "train"
        if self.merge:
            return "merge"
        if not self.init_image_key:
            return "txt2img"
        return "inpaint" if self.mask_image_key else "img2img"

    @property
    def batches(self) -> list[int]:
        """Images per pipeline call: A1111's n_iter batches of batch_size (bounded GPU memory)."""
        size = self.batch_size or self.num_images
        return [min(size, self.num_images - i) for i in range(0, self.num_images, size)]

    @property
    def seeds(self) -> list[int]:
        """One seed per image, consecutive as A1111 numbers them."""
        return [(self.seed + i) % 2**32 for i in range(self.num_images)]

    def batch_key(self) -> str:
        """What a job must share with others to run in one pipeline call with them; "" when it runs alone.

        Why these fields: one call has one model, mode, size, step count,
        scheduler (and its options), guidance, strength and LoRA set; prompts,
        negative prompts, seeds and init images may differ per image.
        Inpainting, extras upscales, trainings, merges, refiner passes, hires fix jobs (a second pass per call) and
        jobs split into several calls (A1111's n_iter) run alone. SDXL jobs with and without a negative prompt do not
        mix: SDXL encodes a missing one as zeros, not as the empty prompt (a
        job of unknown family is treated as SDXL). Prompts in A1111's syntax
        are encoded by sdqueue, plain ones by diffusers: they do not mix.
        """
        if self.mode in ("inpaint", "extras", "train", "merge") or len(self.batches) > 1 or self.refiner or self.hires:
            return ""
        shared = [self.model, self.mode, self.width, self.height, self.num_inference_steps, self.guidance_scale,
                  self.scheduler, sorted(self.scheduler_config.items()), [(lr.name, lr.weight) for lr in self.loras],
                  self.strength if self.mode == "img2img" else None,
                  bool(self.negative_prompt) if self.family in ZERO_NEGATIVE_FAMILIES else None]
        if self.prompt_syntax:
            shared.append(self.prompt_syntax)
        return hashlib.sha1(orjson.dumps(shared, default=str)).hexdigest()[:16]

    @property
    def extension(self) -> str:
        """File extension for the output format (jpeg is stored as .jpg)."""
        return {"jpeg": "jpg"}.get(self.output_format, self.output_format)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (faster than dataclasses.asdict: this runs on every submission).

        Fields still at their empty defaults are left out, so the native hot
        path stores no more than it did before the dialect fields existed.
        """
        data = {k: v for k, v in vars(self).items() if v or k not in _OMIT_WHEN_EMPTY}
        data["loras"] = [{"name": lr.name, "weight": lr.weight} for lr in self.loras]
        return data

    def to_json(self) -> str:
        return orjson.dumps(self.to_dict()).decode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["loras"] = [LoraRef(**lr) for lr in values.get("loras") or []]
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        return cls.from_dict(json.loads(text))
