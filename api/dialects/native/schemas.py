"""The native API's schemas: each validates a request or documents an answer.

The request bounds are the service's settings, read when a request is
validated (api/schemas.py: Setting), so one module-level schema serves
every app and the OpenAPI document shows the bounds in force.
"""
from __future__ import annotations

from typing import Any

from flask import has_request_context
from marshmallow import Schema, ValidationError, fields, validate, validates, validates_schema

from api.auth import current_key
from api.inpaint import FILLS
from api.loras import owned_loras
from api.merges import DEFAULT_MULTIPLIER, DTYPES as MERGE_DTYPES, METHODS as MERGE_METHODS, OUTPUT_SUFFIX
from api.trainings import LORA_NAME, LR_SCHEDULERS
from api.schemas import (MAX_SEED, BaseSchema, InitImageField, JsonSize, LooseInteger, Setting, SettingLength,
                         SettingRange, StrictFloat, limit, multiple_of_8)
from api.eventstream import EVENT_ID
from api.services import services
from common.controlnets import CANNY_HIGH, CANNY_LOW, MAX_UNITS, PROCESSOR_RES, RESIZE_MODES
from common.netguard import callback_guard
from common.promptsyntax import PLAIN, PROMPT_SYNTAXES
from common.schedulers import SCHEDULERS
from common.store.checkpoints import filename_problem
from common.store.datasets import item_name_problem
from common.store.datasets import name_problem as dataset_name_problem
from common.store.results import EVENT_KINDS
from common.store.tasks import PRIORITIES


OUTPUT_FORMATS = ("png", "jpg", "jpeg", "webp")
MAX_LORAS = 8
SIZE = dict(allow_none=True, load_default=None,
            validate=[SettingRange(limit("min_size"), limit("max_size")), multiple_of_8])


class LoraSchema(BaseSchema):
    name = fields.String(required=True, metadata={"description": "LoRA file name (without extension) in the LoRA directory"})
    weight = StrictFloat(load_default=1.0, validate=validate.Range(-10, 10),
                         metadata={"description": "Adapter weight"})


class ControlNetUnitSchema(BaseSchema):
    """One ControlNet unit (several: MultiControlNet)."""

    model = fields.String(required=True, metadata={"description": "A ControlNet in models/controlnet (GET "
                                                                  "/api/v1/models: controlnets), of the model's generation"})
    image = InitImageField(allow_none=True, load_default=None, metadata={
        "description": "The control image (base64, as init_image); omitted with init_image: the init image"})
    scale = StrictFloat(load_default=1.0, validate=validate.Range(0, 5), metadata={
        "description": "controlnet_conditioning_scale (the extension's weight); 0: no effect"})
    start = StrictFloat(load_default=0.0, validate=validate.Range(0, 1),
                        metadata={"description": "Fraction of the steps where it starts acting"})
    end = StrictFloat(load_default=1.0, validate=validate.Range(0, 1),
                      metadata={"description": "Fraction of the steps where it stops acting"})
    preprocessor = fields.String(load_default="none", metadata={
        "description": "none (the image is the control map) or canny (edges of the image)"})
    low_threshold = StrictFloat(load_default=CANNY_LOW, metadata={"description": "canny's low threshold"})
    high_threshold = StrictFloat(load_default=CANNY_HIGH, metadata={"description": "canny's high threshold"})
    processor_res = LooseInteger(load_default=PROCESSOR_RES, metadata={
        "description": "The preprocessor's resolution (short side of the image it reads)"})
    resize_mode = fields.String(load_default="crop_and_resize", validate=validate.OneOf(RESIZE_MODES), metadata={
        "description": "How the control image is fitted to the output size: just_resize (stretch), crop_and_resize "
                       "(cover, crop the centre), resize_and_fill (fit inside, pad)"})
    guess_mode = fields.Boolean(load_default=False, metadata={
        "description": "diffusers' guess mode (the extension's \"ControlNet is more important\"): the ControlNet "
                       "reads the conditional pass only; every unit of a request must agree"})


class WebhookFields(BaseSchema):
    """callback_url and callback_events, as generation and training requests take them."""

    callback_url = fields.Url(allow_none=True, load_default=None, require_tld=False, schemes={"http", "https"},
                              metadata={"description": "POSTed the result when the task ends"})
    callback_events = fields.List(fields.String(validate=validate.OneOf(EVENT_KINDS)), allow_none=True,
                                  load_default=None, validate=validate.Length(min=1, max=len(EVENT_KINDS)), metadata={
        "description": "The events POSTed to callback_url (docs/events.md), with the payloads of the SSE events: any "
                       "of queued, started, progress, preview, completed, failed, cancelled; default: the final ones"})

    @validates_schema
    def events_need_a_callback(self, data: dict, **_: Any) -> None:
        if data.get("callback_events") and not data.get("callback_url"):
            raise ValidationError("callback_events choose what callback_url receives: send callback_url too",
                                  field_name="callback_events")

    @validates("callback_url")
    def public_callback(self, value: str | None, **_: Any) -> None:
        if value is not None and (reason := callback_guard(services().settings).blocked_reason(value)):
            raise ValidationError(f"callback_url refused: {reason}")


class GenerateRequest(WebhookFields):
    """POST /api/v1/generate (the original's table plus model, loras, priority and inpainting)."""

    prompt = fields.String(required=True, validate=SettingLength(max=limit("max_prompt_chars")),
                           metadata={"description": "What to draw", "example": "a cat sitting on a windowsill"})
    prompt_syntax = fields.String(load_default=PLAIN, validate=validate.OneOf(PROMPT_SYNTAXES), metadata={
        "description": "plain: the prompts as written, cut at the text encoder's 77 tokens (as before); a1111: "
                       "the AUTOMATIC1111 web UI's emphasis ((word:1.3), (word), [word], \\( escapes), BREAK and "
                       "prompts longer than 77 tokens, for prompt and negative_prompt; SD 1.x/2.x and SDXL only (422 "
                       "for SD3 and Flux). Textual inversion embeddings apply with either"})
    init_image = InitImageField(allow_none=True, load_default=None, metadata={
        "description": "Base64 image with its data:image/png;base64, (or jpeg) prefix: makes the job img2img; "
                       "the output has the init image's size (rounded down to a multiple of 8, or 16 for SD3 and Flux)"})
    mask_image = InitImageField(allow_none=True, load_default=None, metadata={
        "description": "Inpainting: a mask for init_image (same encoding and pixel limit), white where the image is "
                       "repainted, black where it is kept; resized to the init image's size if it differs. Needs "
                       "init_image"})
    mask_blur = LooseInteger(load_default=4, validate=validate.Range(0, 64), metadata={
        "description": "Inpainting: Gaussian blur (pixels) of the mask's edges, softening the seam; 0: a hard edge"})
    masked_content = fields.String(load_default="original", validate=validate.OneOf(FILLS), metadata={
        "description": "Inpainting: what the masked area starts from: `original` (the init image's pixels, kept "
                       "as much as `strength` leaves them) or `fill` (colours blurred in from around the mask)"})
    negative_prompt = fields.String(allow_none=True, load_default=None, validate=SettingLength(max=limit("max_prompt_chars")),
                                    metadata={"description": "What not to draw; Flux models take none (422)"})
    width = LooseInteger(**SIZE, metadata={"description": "txt2img width; default: the model's native size; "
                                                          "a multiple of 16 for SD3 and Flux"})
    height = LooseInteger(**SIZE, metadata={"description": "txt2img height; default: the model's native size"})
    num_images = LooseInteger(load_default=1, validate=SettingRange(1, limit("max_images")))
    num_inference_steps = LooseInteger(allow_none=True, load_default=None, validate=SettingRange(1, limit("max_steps")),
                                       metadata={"description": "default: the model's (GET /api/v1/models)"})
    guidance_scale = StrictFloat(allow_none=True, load_default=None, validate=validate.Range(0, 50),
                                 metadata={"description": "CFG scale (Flux: its distilled guidance); default: the model's"})
    strength = StrictFloat(allow_none=True, load_default=None, validate=validate.Range(0, 1),
                           metadata={"description": "img2img strength; default: the model's"})
    scheduler = fields.String(allow_none=True, load_default=None, validate=validate.OneOf(list(SCHEDULERS)), metadata={
        "description": "A scheduler that runs the model's schedule (GET /api/v1/schedulers); default: the model's own"})
    seed = LooseInteger(allow_none=True, load_default=None, validate=validate.Range(-1, MAX_SEED),
                        metadata={"description": "null or -1: random (recorded); image n uses seed + n"})
    output_format = fields.String(load_default="png", validate=validate.OneOf(OUTPUT_FORMATS))
    preview_every = LooseInteger(load_default=0, validate=SettingRange(0, Setting("limits.max_steps")), metadata={
        "description": "A small preview of the image every this many steps, sent as SSE `preview` events "
                       "(GET /api/v1/tasks/{id}/events) and webhook events; 0: none. A job makes at most "
                       "tasks.max_previews previews (a smaller interval is widened)"})
    model = fields.String(allow_none=True, load_default=None, metadata={
        "description": "Model name (GET /api/v1/models), or the file name of one of this key's own Stable-diffusion "
                       "checkpoints (a merge's result, or one uploaded through the AWS extension API)"})
    loras = fields.List(fields.Nested(LoraSchema), load_default=list, validate=validate.Length(max=MAX_LORAS))
    refiner = fields.String(allow_none=True, load_default=None, metadata={
        "description": "An SDXL refiner (or SDXL) model that finishes an SDXL model's denoising (GET /api/v1/models)"})
    refiner_switch = StrictFloat(allow_none=True, load_default=None, validate=validate.Range(0.01, 0.99), metadata={
        "description": "Fraction of the steps the model runs before the refiner takes over; default 0.8"})
    controlnet = fields.List(fields.Nested(ControlNetUnitSchema), load_default=list,
                             validate=validate.Length(max=MAX_UNITS), metadata={
        "description": "ControlNet units (SD 1.x/2.x and SDXL models; several at once: MultiControlNet), with "
                       "txt2img, img2img and inpainting; not with a refiner"})
    priority = fields.String(load_default="normal", validate=validate.OneOf(PRIORITIES), metadata={
        "description": "high, normal or low: the order workers take waiting jobs in (queue_position shows it); "
                       "a key may be limited to some (api.keys[].priorities)"})

    @validates("model")
    def known_model(self, value: str | None, **_: Any) -> None:
        if value is None or services().catalog.model(value) is not None:
            return
        if not has_request_context():
            # A key's own checkpoint needs its identity: api/fastsubmit.py (no Flask context) hands this one to Flask.
            raise ValidationError("a model outside the model directory: resolved by the Flask route")
        if services().checkpoints.find_active("Stable-diffusion", value, current_key().owner) is None:
            raise ValidationError(f"unknown model '{value}'; see GET /api/v1/models (or name one of this key's own "
                                  f"checkpoints by its file name)")

    @validates("refiner")
    def known_refiner(self, value: str | None, **_: Any) -> None:
        if value is not None and services().catalog.model(value) is None:
            raise ValidationError(f"unknown model '{value}'; see GET /api/v1/models")

    @validates("loras")
    def known_loras(self, value: list[dict], **_: Any) -> None:
        svc = services()
        available = svc.catalog.loras()
        # Only items that loaded as LoRAs (a dict with a string name); the others carry their own errors.
        names = {i: lr["name"] for i, lr in enumerate(value) if isinstance(lr, dict) and isinstance(lr.get("name"), str)}
        unknown = {i: name for i, name in names.items() if name not in available}
        if unknown and not has_request_context():
            # The key's own LoRAs need its identity: api/fastsubmit.py (no Flask context) hands this one to Flask.
            raise ValidationError("a LoRA outside the LoRA directory: resolved by the Flask route")
        owned = owned_loras(svc, current_key().owner) if unknown else {}     # the key's own (trained, uploaded)
        errors = {i: {"name": [f"unknown LoRA '{name}'; see GET /api/v1/loras"]}
                  for i, name in unknown.items() if name not in owned}
        if errors:
            raise ValidationError(errors)

    @validates_schema
    def mask_needs_init_image(self, data: dict, **_: Any) -> None:
        if data.get("mask_image") is not None and data.get("init_image") is None:
            raise ValidationError("inpainting repaints part of init_image: send init_image too", field_name="mask_image")

    @validates_schema
    def init_image_size(self, data: dict, **_: Any) -> None:
        image = data.get("init_image")
        if image is None:
            return
        lim = services().settings.limits
        w, h = image.width // 8 * 8, image.height // 8 * 8
        if not (lim.min_size <= w <= lim.max_size and lim.min_size <= h <= lim.max_size):
            raise ValidationError(
                f"init image is {image.width}x{image.height}; each side must be within "
                f"{lim.min_size}..{lim.max_size} pixels", field_name="init_image")


class TaskCreatedSchema(Schema):
    task_id = fields.String(metadata={"example": "550e8400-e29b-41d4-a716-446655440000"})
    status = fields.String(metadata={"example": "pending"})
    message = fields.String(metadata={"example": "任务已创建，正在处理中"})


class ProgressSchema(Schema):
    step = fields.Integer()
    total = fields.Integer()
    fraction = fields.Float()


class TaskSchema(Schema):
    task_id = fields.String()
    status = fields.String(metadata={"description": "pending, processing, completed, failed or cancelled"})
    result_url = fields.String(allow_none=True, metadata={"description": "The image URL when num_images is 1"})
    result_urls = fields.List(fields.String(), allow_none=True, metadata={"description": "Image URLs when num_images > 1"})
    error_message = fields.String(allow_none=True)
    created_at = fields.String(metadata={"description": "ISO 8601, UTC", "example": "2024-01-01T12:00:00"})
    updated_at = fields.String(metadata={"description": "ISO 8601, UTC"})
    progress = fields.Nested(ProgressSchema)
    queue_position = fields.Integer(allow_none=True, metadata={
        "description": "1-based place in the queue while pending (priority classes first, then arrival)"})
    priority = fields.String(metadata={"description": "high, normal or low"})
    seeds = fields.List(fields.Integer(), metadata={"description": "The seed of each image, in order"})
    model = fields.String()
    num_images = fields.Integer()
    callback_status = fields.String(allow_none=True, metadata={
        "description": "With a callback_url: queued, retrying after attempt N: ..., delivered: HTTP 200 after N "
                       "attempt(s), rejected by the receiver, refused: <reason>, or failed after N attempts"})


class PageSchema(Schema):
    """A page of a listing: how many there are in all, and which slice this is."""

    total = fields.Integer()
    limit = fields.Integer()
    offset = fields.Integer()


class PageQuery(BaseSchema):
    """?limit= and ?offset= of a listing."""

    limit = LooseInteger(load_default=20, validate=validate.Range(1, 100))
    offset = LooseInteger(load_default=0, validate=validate.Range(0, 1_000_000))


class TaskListSchema(PageSchema):
    tasks = fields.List(fields.Nested(TaskSchema))


class TaskListQuery(PageQuery):
    status = fields.String(load_default=None, validate=validate.OneOf(
        ["pending", "processing", "completed", "failed", "cancelled"]))


class EventsQuery(BaseSchema):
    last_event_id = fields.String(load_default=None, validate=validate.Regexp(EVENT_ID), metadata={
        "description": "Resume after this event (as the Last-Event-ID header, which wins): for clients that cannot "
                       "set headers"})


class TaskQuery(BaseSchema):
    wait = StrictFloat(load_default=0, validate=SettingRange(0, Setting("api.max_wait_seconds")), metadata={
        "description": "Seconds to wait for the task to finish before answering (long polling)"})


class ModelDefaultsSchema(Schema):
    width = fields.Integer()
    height = fields.Integer()
    steps = fields.Integer()
    guidance_scale = fields.Float()
    strength = fields.Float()
    scheduler = fields.String(allow_none=True, metadata={"description": "null: the model's own"})


class ModelSchema(Schema):
    name = fields.String()
    type = fields.String(metadata={"description": "diffusers (folder) or single_file"})
    family = fields.String(metadata={"description": "sd1, sd2, sdxl, sdxl-refiner, sd3 or flux"})
    family_label = fields.String(metadata={"example": "Stable Diffusion XL"})
    width = fields.Integer(metadata={"description": "Default width (the model's native size unless configured)"})
    height = fields.Integer()
    size_multiple = fields.Integer(metadata={"description": "width and height must be multiples of this"})
    schedule = fields.String(metadata={"description": "beta or flow: which schedulers apply (GET /api/v1/schedulers)"})
    negative_prompt = fields.Boolean(metadata={"description": "Whether the model takes a negative prompt"})
    txt2img = fields.Boolean(metadata={"description": "false: a refiner, usable only as `refiner`"})
    defaults = fields.Nested(ModelDefaultsSchema, metadata={"description": "What a request that names none gets"})
    problem = fields.String(allow_none=True, metadata={"description": "Why it cannot be served, or null"})
    default = fields.Boolean()
    loaded = fields.Boolean(metadata={"description": "Warm on at least one live worker"})


class ControlNetSchema(Schema):
    name = fields.String()
    title = fields.String(metadata={"description": "As sd-webui-controlnet lists it: name [hash]"})
    type = fields.String(metadata={"description": "diffusers (a folder) or single_file"})
    family = fields.String(metadata={"description": "sd1 (SD 1.x/2.x models) or sdxl"})
    context_width = fields.Integer(allow_none=True)


class OwnModelSchema(Schema):
    name = fields.String(metadata={"description": "The file name `model` takes"})
    family = fields.String()
    checkpoint_id = fields.String()
    source = fields.String(metadata={"description": "merge (a merge's result) or upload (the AWS extension API)"})
    created = fields.Float(metadata={"description": "Epoch seconds"})


class ModelListSchema(Schema):
    models = fields.List(fields.Nested(ModelSchema))
    own = fields.List(fields.Nested(OwnModelSchema), metadata={
        "description": "This key's own Stable-diffusion checkpoints; no other key sees them"})
    controlnets = fields.List(fields.Nested(ControlNetSchema), metadata={
        "description": "ControlNet models in models/controlnet, usable in `controlnet`"})
    default = fields.String(allow_none=True)


class SchedulerSchema(Schema):
    name = fields.String()
    description = fields.String()
    schedule = fields.String(metadata={"description": "beta (SD 1.x/2.x/SDXL) or flow (SD3, Flux)"})


class SchedulerListSchema(Schema):
    schedulers = fields.List(fields.Nested(SchedulerSchema))
    default = fields.String(allow_none=True)


class LoraEntrySchema(Schema):
    name = fields.String(metadata={"description": "What `loras: [{\"name\": ...}]` and `<lora:name:1>` take"})
    source = fields.String(metadata={"description": "directory (the shared LoRA directory) or own (this key's: "
                                                    "trained, or uploaded through the AWS extension's /checkpoint)"})
    checkpoint_id = fields.String(metadata={"description": "own: its checkpoint"})
    base_model = fields.String(allow_none=True, metadata={"description": "own, trained: the model it was trained on"})
    family = fields.String(allow_none=True, metadata={"description": "own, trained: the family it fits"})
    training_job = fields.String(allow_none=True, metadata={"description": "own, trained: the training job's id"})


class LoraListSchema(Schema):
    loras = fields.List(fields.Nested(LoraEntrySchema))


# An instance, not a class: webargs would build (and deep-copy) a schema per request. api/fastsubmit.py uses it too.
GENERATE_REQUEST = GenerateRequest()


# --- datasets -----------------------------------------------------------------------------------
class DatasetFileSchema(BaseSchema):
    name = fields.String(required=True, metadata={"description": "The file's name in the dataset: an image (.png, "
                                                                 ".jpg, .jpeg, .webp) or a caption (.txt) for the "
                                                                 "image of the same stem"})
    caption = fields.String(allow_none=True, load_default=None, validate=validate.Length(max=4096),
                            metadata={"description": "The image's caption (instead of a .txt file)"})

    @validates("name")
    def plain(self, value: str, **_: Any) -> None:
        if problem := item_name_problem(value):
            raise ValidationError(problem)


class DatasetCreateSchema(BaseSchema):
    """POST /api/v1/datasets."""

    name = fields.String(required=True, metadata={"description": "The dataset's name (per key)", "example": "my-cat"})
    files = fields.List(fields.Nested(DatasetFileSchema), required=True, validate=validate.Length(min=1))
    params = fields.Dict(load_default=dict, validate=JsonSize(), metadata={"description": "Free-form, kept with it"})

    @validates("name")
    def plain(self, value: str, **_: Any) -> None:
        if problem := dataset_name_problem(value):
            raise ValidationError(problem)


class DatasetItemSchema(Schema):
    name = fields.String()
    type = fields.String(metadata={"description": "image or text (a caption file)"})
    status = fields.String()
    caption = fields.String(allow_none=True)
    width = fields.Integer()
    height = fields.Integer()
    size = fields.Integer()
    url = fields.String(metadata={"description": "A presigned GET URL of the file"})
    upload_url = fields.String(metadata={"description": "The presigned PUT URL (in the answer to its creation)"})


class DatasetSchema(Schema):
    name = fields.String()
    status = fields.String(metadata={"description": "Initialed, Enabled (every file checked) or Disabled"})
    created_at = fields.String()
    params = fields.Dict()
    files = fields.List(fields.Nested(DatasetItemSchema))


class DatasetListSchema(Schema):
    datasets = fields.List(fields.Nested(DatasetSchema))


# --- trainings ----------------------------------------------------------------------------------
class TrainingCreateSchema(WebhookFields):
    """POST /api/v1/trainings: a LoRA trained on one of this key's Enabled datasets (docs/training.md)."""

    dataset = fields.String(required=True, metadata={"description": "An Enabled dataset of this key (its name)",
                                                     "example": "my-cat"})
    model = fields.String(allow_none=True, load_default=None, metadata={
        "description": "The base model: an SD 1.x/2.x or SDXL model of GET /api/v1/models, or the file name of one of "
                       "this key's own Stable-diffusion checkpoints (a merge's result, an upload); default: the "
                       "default model"})
    lora_name = fields.String(allow_none=True, load_default=None, validate=validate.Length(min=1, max=100), metadata={
        "description": "The LoRA's name (letters, digits, '_.-'): `loras: [{\"name\": ...}]` and `<lora:name:1>` use "
                       "it once the job completes; default: {dataset}-{first 8 characters of the job id}"})
    max_steps = LooseInteger(allow_none=True, load_default=None,
                             validate=SettingRange(1, Setting("training.max_steps")), metadata={
        "description": "Optimizer steps in all; default 500 (or from epochs)"})
    epochs = LooseInteger(allow_none=True, load_default=None, validate=validate.Range(1, 10000), metadata={
        "description": "Instead of max_steps: passes over the dataset (steps = epochs x ceil(images / batch_size) / "
                       "gradient_accumulation)"})
    rank = LooseInteger(load_default=8, validate=validate.Range(1, 256), metadata={
        "description": "LoRA rank (network_dim): 4-32 is usual; the file grows with it"})
    alpha = StrictFloat(allow_none=True, load_default=None, validate=validate.Range(0.01, 1024), metadata={
        "description": "LoRA alpha (network_alpha); the update is scaled by alpha / rank; default: the rank"})
    learning_rate = StrictFloat(load_default=1e-4, validate=validate.Range(1e-7, 1e-2), metadata={
        "description": "AdamW's learning rate"})
    lr_scheduler = fields.String(load_default="constant", validate=validate.OneOf(LR_SCHEDULERS), metadata={
        "description": "diffusers' get_scheduler name"})
    lr_warmup_steps = LooseInteger(load_default=0, validate=validate.Range(0, 100000))
    batch_size = LooseInteger(load_default=1, validate=validate.Range(1, 64), metadata={
        "description": "Images per micro-batch (of one aspect bucket)"})
    gradient_accumulation = LooseInteger(load_default=1, validate=validate.Range(1, 128), metadata={
        "description": "Micro-batches per optimizer step (an effective batch of batch_size x this)"})
    resolution = LooseInteger(allow_none=True, load_default=None, validate=validate.Range(64, 2048), metadata={
        "description": "Training side in pixels, a multiple of 64 (images are bucketed by aspect ratio to about "
                       "resolution^2 pixels); default: the model's native size"})
    mixed_precision = fields.String(load_default="no", validate=validate.OneOf(("no", "fp16", "bf16")), metadata={
        "description": "Autocast of the training math; the base weights stay in the worker's dtype, and on a GPU "
                       "half-precision weights always train under autocast (fp16 with loss scaling unless bf16 is "
                       "asked for, bf16 weights under bf16); no on the CPU's fp32 weights"})
    seed = LooseInteger(allow_none=True, load_default=None, validate=validate.Range(-1, MAX_SEED), metadata={
        "description": "null or -1: random (recorded); the same seed, data and settings train the same LoRA"})
    trigger_word = fields.String(load_default="", validate=validate.Length(max=100), metadata={
        "description": "Put first in every caption: the word a prompt uses to call up what was learned"})
    checkpoint_every = LooseInteger(allow_none=True, load_default=None, validate=validate.Range(0, 100000), metadata={
        "description": "Steps between resumable checkpoints in S3 (a killed worker's job resumes from the newest); "
                       "0: none; default: training.checkpoint_every"})
    noise_offset = StrictFloat(load_default=0.0, validate=validate.Range(0, 1), metadata={
        "description": "Offset noise (0.05-0.1 helps very dark or bright images); 0: off"})
    gradient_checkpointing = fields.Boolean(load_default=False, metadata={
        "description": "Recompute the UNet's activations in the backward: a fraction of the memory for about a third "
                       "more time per step (SDXL at 1024 px on a 24 GB card needs it); the same LoRA either way"})

    @validates("lora_name")
    def plain_name(self, value: str | None, **_: Any) -> None:
        if value is not None and not LORA_NAME.match(value):
            raise ValidationError("letters, digits and '_.-' only, starting with a letter or digit")

    @validates("resolution")
    def multiple_of_64(self, value: int | None, **_: Any) -> None:
        if value is not None and value % 64:
            raise ValidationError("must be a multiple of 64")

    @validates_schema
    def steps_or_epochs(self, data: dict, **_: Any) -> None:
        if data.get("max_steps") and data.get("epochs"):
            raise ValidationError("give max_steps or epochs, not both", field_name="epochs")


class LoraResultSchema(Schema):
    name = fields.String(metadata={"description": "Use it as `loras: [{\"name\": ...}]` or `<lora:name:1>`"})
    file = fields.String()
    checkpoint_id = fields.String(metadata={"description": "Its checkpoint (GET /checkpoints of the AWS API)"})
    s3_location = fields.String()
    download_url = fields.String(allow_none=True, metadata={
        "description": "A presigned GET URL of the .safetensors file; null once the key deleted the LoRA"})
    resumed_from_step = fields.Integer(metadata={"description": "The checkpoint step a rerun resumed from; 0: none"})


class TrainingSchema(Schema):
    id = fields.String()
    status = fields.String(metadata={"description": "pending, processing, completed, failed or cancelled"})
    dataset = fields.String()
    model = fields.String()
    lora_name = fields.String()
    config = fields.Dict(metadata={"description": "The hyper-parameters in force, defaults filled"})
    progress = fields.Nested(ProgressSchema)
    eta_seconds = fields.Float(allow_none=True)
    loss = fields.Float(allow_none=True, metadata={"description": "The latest optimizer step's loss"})
    loss_curve = fields.List(fields.List(fields.Float()), metadata={
        "description": "[[step, mean loss], ...], at most training.curve_points points (neighbours averaged)"})
    lora = fields.Nested(LoraResultSchema, allow_none=True, metadata={"description": "Once completed"})
    attempt = fields.Integer(metadata={"description": "0, or how many times a killed worker's job was resent"})
    error_message = fields.String(allow_none=True)
    warnings = fields.List(fields.String())
    queue_position = fields.Integer(allow_none=True)
    created_at = fields.String()
    updated_at = fields.String()
    events_url = fields.String(metadata={"description": "Its server-sent events (progress carries the loss)"})
    callback_status = fields.String(allow_none=True)


class TrainingListSchema(PageSchema):
    trainings = fields.List(fields.Nested(TrainingSchema))


MERGE_MODEL = ("A model of GET /api/v1/models (a diffusers folder of SD 1.x or SDXL is converted to a single file; "
               "single files must be .safetensors), or the file name of one of this key's Active Stable-diffusion "
               "checkpoints (uploaded, or made by an earlier merge)")


class MergeCreateSchema(WebhookFields):
    """POST /api/v1/merges: the AUTOMATIC1111 web UI's checkpoint merger, as a queued job (docs/api.md)."""

    primary = fields.String(required=True, validate=validate.Length(min=1, max=300), metadata={
        "description": f"Model A. {MERGE_MODEL}", "example": "sdq-tiny"})
    secondary = fields.String(required=True, validate=validate.Length(min=1, max=300), metadata={
        "description": f"Model B, of A's family. {MERGE_MODEL}"})
    tertiary = fields.String(allow_none=True, load_default=None, validate=validate.Length(min=1, max=300), metadata={
        "description": "Model C (add_difference only): the base B was tuned from, of A's family"})
    method = fields.String(load_default="weighted_sum", validate=validate.OneOf(MERGE_METHODS), metadata={
        "description": "weighted_sum: A x (1 - M) + B x M; add_difference: A + (B - C) x M"})
    multiplier = StrictFloat(load_default=DEFAULT_MULTIPLIER, validate=validate.Range(0, 1), metadata={
        "description": "M, 0..1 (the web UI's default 0.3; 0 gives A)"})
    name = fields.String(allow_none=True, load_default=None, validate=validate.Length(min=1, max=180), metadata={
        "description": "The merged file's name without .safetensors; default: the web UI's, e.g. "
                       "\"0.7(A) + 0.3(B)\"; a name this key already has is replaced for new jobs (the newest wins)"})
    dtype = fields.String(load_default="keep", validate=validate.OneOf(tuple(MERGE_DTYPES)), metadata={
        "description": "The merged weights' precision: keep (as A has them), fp16 (the web UI's \"save as float16\"), "
                       "bf16 or fp32"})

    @validates("name")
    def plain_file_name(self, value: str | None, **_: Any) -> None:
        if value is not None and (problem := filename_problem(f"{value}{OUTPUT_SUFFIX}")):
            raise ValidationError(problem)

    @validates_schema
    def tertiary_for_add_difference(self, data: dict, **_: Any) -> None:
        if data.get("method") == "add_difference" and not data.get("tertiary"):
            raise ValidationError("add_difference needs a tertiary model (the base the secondary was tuned from)",
                                  field_name="tertiary")
        if data.get("method") == "weighted_sum" and data.get("tertiary"):
            raise ValidationError("a weighted sum takes no tertiary model; use add_difference for three",
                                  field_name="tertiary")


class MergeInputsSchema(Schema):
    primary = fields.String()
    secondary = fields.String()
    tertiary = fields.String(allow_none=True)


class MergedCheckpointSchema(Schema):
    name = fields.String(metadata={"description": "Its file name: /inference/v2's models.Stable-diffusion and later "
                                                  "merges name it so"})
    checkpoint_id = fields.String(metadata={"description": "Its checkpoint (GET /checkpoint of the AWS API)"})
    s3_location = fields.String()
    family = fields.String()
    size_bytes = fields.Integer()
    tensors_merged = fields.Integer()
    kept_from_primary = fields.Integer(metadata={"description": "Tensors A alone has, kept as they are"})


class MergeSchema(Schema):
    id = fields.String()
    status = fields.String(metadata={"description": "pending, processing, completed, failed or cancelled"})
    inputs = fields.Nested(MergeInputsSchema)
    method = fields.String()
    multiplier = fields.Float()
    dtype = fields.String()
    family = fields.String()
    file = fields.String(metadata={"description": "The file the merge writes"})
    checkpoint_id = fields.String(metadata={"description": "The checkpoint it registers (known from the start)"})
    progress = fields.Nested(ProgressSchema, metadata={"description": "Tensors merged of all"})
    eta_seconds = fields.Float(allow_none=True)
    checkpoint = fields.Nested(MergedCheckpointSchema, allow_none=True, metadata={"description": "Once completed"})
    attempt = fields.Integer()
    error_message = fields.String(allow_none=True)
    warnings = fields.List(fields.String())
    queue_position = fields.Integer(allow_none=True)
    created_at = fields.String()
    updated_at = fields.String()
    events_url = fields.String()
    callback_status = fields.String(allow_none=True)


class MergeListSchema(PageSchema):
    merges = fields.List(fields.Nested(MergeSchema))
