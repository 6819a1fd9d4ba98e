"""The AUTOMATIC1111 web UI API's schemas (names and defaults as A1111's own API models).

Why its own module: A1111 clients send dozens of fields sdqueue must accept
with A1111's defaults (modules/api/models.py + StableDiffusionProcessing);
the same schemas document the dialect in /openapi.json.
"""
from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from api.init_image import InitImageError, decode_init_image
from api.schemas import (MAX_SEED, BaseSchema, InitImageField, JsonSize, LooseInteger, SettingLength, SettingRange,
                         StrictFloat, limit)
from api.services import services


class ImageList(fields.List):
    """A list of base64 images (A1111: bare base64 or data URLs), decoded and checked on load."""

    def __init__(self, **kwargs: Any):
        super().__init__(fields.String(), **kwargs)

    def _deserialize(self, value: Any, attr, data, **kwargs):
        texts = super()._deserialize(value, attr, data, **kwargs)
        most = services().settings.limits.max_images
        if len(texts) > most:            # counted before any image is decoded
            raise ValidationError(f"at most {most} images (limits.max_images)")
        images, errors = [], {}
        for i, text in enumerate(texts):
            try:
                images.append(decode_init_image(text))
            except InitImageError as exc:
                errors[i] = [str(exc)]
        if errors:
            raise ValidationError(errors)
        return images


MAX_STYLES = 32   # A1111 style names a request may list (kept in its echoed parameters)
UNSUPPORTED = ("A value that would change the image in a way sdqueue does not run is a 422 naming the field "
               "(a lenient key, api.lenient, accepts it and names it in info.warnings); see docs/compat/a1111.md")
SIZE = dict(load_default=None, allow_none=True, validate=SettingRange(limit("min_size"), limit("max_size", plus=7)),
            metadata={"description": "Pixels; rounded down to a multiple of 8 as A1111's latent space does (16 for "
                                     "SD3 and Flux). Default: 512 for SD 1.x/2.x as A1111; the model's native "
                                     "size for SDXL, SD3 and Flux (img2img: the init image's size)"})


class Txt2ImgRequest(BaseSchema):
    """POST /sdapi/v1/txt2img: A1111's StableDiffusionTxt2ImgProcessingAPI fields and defaults."""

    prompt = fields.String(load_default="", validate=SettingLength(max=limit("max_prompt_chars")))
    negative_prompt = fields.String(load_default="", allow_none=True, validate=SettingLength(max=limit("max_prompt_chars")))
    styles = fields.List(fields.String(validate=validate.Length(max=256)), load_default=list, allow_none=True,
                         validate=validate.Length(max=MAX_STYLES),
                         metadata={"description": "sdqueue has no saved styles: only [] is run. " + UNSUPPORTED})
    seed = LooseInteger(load_default=-1, allow_none=True, validate=validate.Range(-1, MAX_SEED),
                        metadata={"description": "-1: random; image n uses seed + n"})
    subseed = LooseInteger(load_default=-1, allow_none=True)
    subseed_strength = StrictFloat(load_default=0.0, allow_none=True)
    seed_resize_from_h = LooseInteger(load_default=-1, allow_none=True)
    seed_resize_from_w = LooseInteger(load_default=-1, allow_none=True)
    sampler_name = fields.String(load_default=None, allow_none=True, metadata={
        "description": "A1111 sampler name, e.g. 'Euler a', 'DPM++ 2M Karras' (GET /sdapi/v1/samplers); "
                       "SD3 and Flux models take Euler or Heun (flow matching)"})
    sampler_index = fields.String(load_default="Euler", allow_none=True,
                                  metadata={"description": "Used when sampler_name is not given"})
    scheduler = fields.String(load_default=None, allow_none=True, metadata={
        "description": "Schedule type: Automatic, Uniform, Karras, Exponential, SGM Uniform, Beta"})
    batch_size = LooseInteger(load_default=1, validate=SettingRange(1, limit("max_images")))
    n_iter = LooseInteger(load_default=1, validate=SettingRange(1, limit("max_images")))
    steps = LooseInteger(load_default=None, allow_none=True, validate=SettingRange(1, limit("max_steps")), metadata={
        "description": "Default: 50 for SD 1.x/2.x as A1111; the model's default for SDXL, SD3 and Flux"})
    cfg_scale = StrictFloat(load_default=None, allow_none=True, validate=validate.Range(0, 50), metadata={
        "description": "Default: 7 for SD 1.x/2.x as A1111; the model's default for SDXL, SD3 and Flux"})
    width = LooseInteger(**SIZE)
    height = LooseInteger(**SIZE)
    restore_faces = fields.Boolean(load_default=None, allow_none=True, metadata={"description": UNSUPPORTED})
    tiling = fields.Boolean(load_default=None, allow_none=True, metadata={"description": UNSUPPORTED})
    do_not_save_samples = fields.Boolean(load_default=False)
    do_not_save_grid = fields.Boolean(load_default=False)
    eta = StrictFloat(load_default=None, allow_none=True)
    denoising_strength = StrictFloat(load_default=None, allow_none=True, validate=validate.Range(0, 1))
    s_min_uncond = StrictFloat(load_default=None, allow_none=True)
    s_churn = StrictFloat(load_default=None, allow_none=True)
    s_tmax = StrictFloat(load_default=None, allow_none=True)
    s_tmin = StrictFloat(load_default=None, allow_none=True)
    s_noise = StrictFloat(load_default=None, allow_none=True)
    override_settings = fields.Dict(keys=fields.String(), load_default=None, allow_none=True, validate=JsonSize(), metadata={
        "description": "sd_model_checkpoint picks the model for this request; options that only concern saving "
                       "pass; other options are refused unless at their default. " + UNSUPPORTED})
    override_settings_restore_afterwards = fields.Boolean(load_default=True)
    refiner_checkpoint = fields.String(load_default=None, allow_none=True, metadata={
        "description": "An SDXL refiner (or SDXL) checkpoint that finishes an SDXL model's denoising"})
    refiner_switch_at = StrictFloat(load_default=None, allow_none=True, metadata={
        "description": "Fraction of the steps before the refiner takes over (default 0.8; 1: no refiner pass)"})
    disable_extra_networks = fields.Boolean(load_default=False)
    comments = fields.Dict(load_default=None, allow_none=True, validate=JsonSize())
    enable_hr = fields.Boolean(load_default=False)
    firstphase_width = LooseInteger(load_default=0)
    firstphase_height = LooseInteger(load_default=0)
    hr_scale = StrictFloat(load_default=2.0)
    hr_upscaler = fields.String(load_default=None, allow_none=True)
    hr_second_pass_steps = LooseInteger(load_default=0)
    hr_resize_x = LooseInteger(load_default=0)
    hr_resize_y = LooseInteger(load_default=0)
    hr_checkpoint_name = fields.String(load_default=None, allow_none=True)
    hr_sampler_name = fields.String(load_default=None, allow_none=True)
    hr_scheduler = fields.String(load_default=None, allow_none=True)
    hr_prompt = fields.String(load_default="", allow_none=True, validate=SettingLength(max=limit("max_prompt_chars")))
    hr_negative_prompt = fields.String(load_default="", allow_none=True,
                                       validate=SettingLength(max=limit("max_prompt_chars")))
    firstpass_image = fields.String(load_default=None, allow_none=True, metadata={
        "description": "Hires fix's first-pass image (base64); not echoed in parameters"})
    force_task_id = fields.String(load_default=None, allow_none=True)
    script_name = fields.String(load_default=None, allow_none=True)
    script_args = fields.List(fields.Raw(), load_default=list, validate=JsonSize())
    send_images = fields.Boolean(load_default=True)
    save_images = fields.Boolean(load_default=False, metadata={
        "description": "Also store the images as outputs/txt2img-images/YYYY-MM-DD/NNNNN-SEED.png in the bucket"})
    alwayson_scripts = fields.Dict(keys=fields.String(), load_default=dict, validate=JsonSize(), metadata={
        "description": "Scripts that are on (args given, not disabled) are refused: sdqueue runs none yet. "
                       + UNSUPPORTED})
    infotext = fields.String(load_default=None, allow_none=True)

    @validates_schema
    def image_count(self, data: dict, **_: Any) -> None:
        most = services().settings.limits.max_images
        if data["batch_size"] * data["n_iter"] > most:
            raise ValidationError(f"batch_size * n_iter must be at most {most}", field_name="n_iter")


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: txt2img's fields plus the init images, mask and inpainting options."""

    init_images = ImageList(required=True, validate=SettingLength(min=1, max=limit("max_images")), metadata={
        "description": "Base64 images (bare or data URLs); the first is the init image"})
    resize_mode = LooseInteger(load_default=0, validate=validate.Range(0, 3))
    image_cfg_scale = StrictFloat(load_default=None, allow_none=True)
    mask = InitImageField(load_default=None, allow_none=True,
                         metadata={"description": "Base64 mask: white is repainted (inpainting)"})
    mask_blur_x = LooseInteger(load_default=4)
    mask_blur_y = LooseInteger(load_default=4)
    mask_blur = LooseInteger(load_default=None, allow_none=True, validate=validate.Range(0, 64))
    mask_round = fields.Boolean(load_default=True)
    inpainting_fill = LooseInteger(load_default=0, validate=validate.Range(0, 3))
    inpaint_full_res = fields.Raw(load_default=True)
    inpaint_full_res_padding = LooseInteger(load_default=0)
    inpainting_mask_invert = LooseInteger(load_default=0, validate=validate.Range(0, 1))
    initial_noise_multiplier = StrictFloat(load_default=None, allow_none=True)
    latent_mask = fields.String(load_default=None, allow_none=True)
    include_init_images = fields.Boolean(load_default=False)
    denoising_strength = StrictFloat(load_default=None, allow_none=True, validate=validate.Range(0, 1), metadata={
        "description": "Default: 0.75 for SD 1.x/2.x as A1111; the model's default for SDXL, SD3 and Flux"})

    @validates_schema
    def init_image_size(self, data: dict, **_: Any) -> None:
        largest = services().settings.limits.max_size * 4
        for image in data.get("init_images") or []:
            if max(image.width, image.height) > largest:
                raise ValidationError(f"init image {image.width}x{image.height} is too large",
                                      field_name="init_images")


class ExtrasRequest(BaseSchema):
    """The web UI's ExtrasBaseRequest: upscaling (and face restoration, which sdqueue refuses unless 0)."""

    resize_mode = LooseInteger(load_default=0, validate=validate.OneOf([0, 1]), metadata={
        "description": "0: upscale by upscaling_resize; 1: to upscaling_resize_w x upscaling_resize_h"})
    show_extras_results = fields.Boolean(load_default=True)
    gfpgan_visibility = StrictFloat(load_default=0, validate=validate.Range(0, 1), metadata={
        "description": "GFPGAN face restoration is not run: only 0. " + UNSUPPORTED})
    codeformer_visibility = StrictFloat(load_default=0, validate=validate.Range(0, 1), metadata={
        "description": "CodeFormer face restoration is not run: only 0. " + UNSUPPORTED})
    codeformer_weight = StrictFloat(load_default=0, validate=validate.Range(0, 1))
    upscaling_resize = StrictFloat(load_default=2, validate=validate.Range(1, 8))
    upscaling_resize_w = LooseInteger(load_default=512, validate=validate.Range(min=1))
    upscaling_resize_h = LooseInteger(load_default=512, validate=validate.Range(min=1))
    upscaling_crop = fields.Boolean(load_default=True)
    upscaler_1 = fields.String(load_default="None", metadata={"description": "GET /sdapi/v1/upscalers; None: no upscale"})
    upscaler_2 = fields.String(load_default="None")
    extras_upscaler_2_visibility = StrictFloat(load_default=0, validate=validate.Range(0, 1))
    upscale_first = fields.Boolean(load_default=False)


class ExtrasSingleImageRequest(ExtrasRequest):
    image = InitImageField(required=True, metadata={"description": "Base64 image (bare or data URL)"})


class FileData(BaseSchema):
    data = InitImageField(required=True)
    name = fields.String(load_default="")


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList = fields.List(fields.Nested(FileData), required=True,
                            validate=SettingLength(min=1, max=limit("max_images")))


class OptionsUpdate(BaseSchema):
    """POST /sdapi/v1/options: any option names (stored per key, so bounded in size); sd_model_checkpoint must
    name a model."""

    class Meta:
        unknown = "include"

    @validates_schema
    def bounded(self, data: dict, **_: Any) -> None:
        JsonSize()(data)


class PngInfoRequest(BaseSchema):
    image = fields.String(required=True, metadata={"description": "Base64 PNG (bare or data URL)"})


class ProgressQuery(BaseSchema):
    skip_current_image = fields.Boolean(load_default=False)


class A1111Response(Schema):
    images = fields.List(fields.String(), metadata={"description": "Base64 PNGs with their parameters chunk"})
    parameters = fields.Dict(metadata={"description": "The request, with defaults filled in"})
    info = fields.String(metadata={"description": "JSON string: seed, all_seeds, infotexts, ..."})


# Instances, not classes: webargs would build (and deep-copy) a schema per request.
TXT2IMG_REQUEST = Txt2ImgRequest()
IMG2IMG_REQUEST = Img2ImgRequest()
EXTRAS_SINGLE_REQUEST = ExtrasSingleImageRequest()
EXTRAS_BATCH_REQUEST = ExtrasBatchImagesRequest()
