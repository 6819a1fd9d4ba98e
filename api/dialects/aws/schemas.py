"""The AWS SD extension API's schemas.

Why its own module: /inference/v2 is A1111's request plus the extension's
envelope (task_type, models, sagemaker_endpoint_name) with the extension's
template defaults (28 steps, "Euler a"); the model API has its own bodies
with the extension's names, camelCase included.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from marshmallow import ValidationError, fields, pre_load, validate, validates, validates_schema

from api.dialects.a1111 import Img2ImgRequest, Txt2ImgRequest
from api.schemas import BaseSchema, JsonSize, LooseInteger, SettingRange, StrictFloat, limit
from common.store.checkpoints import CHECKPOINT_TYPES, FILE_SUFFIXES, STATUSES, filename_problem
from common.store.checkpoints import FILENAME as CHECKPOINT_FILENAME
from common.store.datasets import STATUSES as DATASET_STATUSES
from common.store.datasets import item_name_problem
from common.store.datasets import name_problem as dataset_name_problem
from common.store.trainjobs import MODEL_STATUSES, TRAIN_STATUSES


TASK_TYPES = ("txt2img", "img2img")
POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")
MAX_PARTS = 10000   # S3's limit on parts per multipart upload
# What filename_problem accepts, as the document can say it (it also refuses "..", and takes any suffix's case).
FILENAME_PATTERN = (r"^[A-Za-z0-9][A-Za-z0-9_.\- ()+\[\]]{0,180}\.("
                    + "|".join(s.lstrip(".") for s in FILE_SUFFIXES) + ")$")


def check_pool_name(value: str) -> None:
    if not POOL_NAME.match(value):
        raise ValidationError("an endpoint name is 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit")


class ModelsField(fields.Dict):
    """{"Stable-diffusion": [file], "Lora": [files], ...}: lists of model file names by type."""

    def __init__(self, **kwargs: Any):
        names = {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 200}}
        properties = {kind: {**names, "minItems": 1} if kind == "Stable-diffusion" else names
                      for kind in CHECKPOINT_TYPES}
        kwargs.setdefault("metadata", {}).update(   # the document says what _deserialize requires
            properties=properties, required=["Stable-diffusion"])
        super().__init__(keys=fields.String(validate=validate.OneOf(CHECKPOINT_TYPES)),
                         values=fields.List(fields.String(validate=validate.Length(1, 200))), **kwargs)

    def _deserialize(self, value: Any, attr, data, **kwargs):
        models = super()._deserialize(value, attr, data, **kwargs)
        if not models.get("Stable-diffusion"):
            raise ValidationError({"Stable-diffusion": ["a list with the checkpoint file name is required"]})
        return models


class InferenceEnvelope(BaseSchema):
    """The extension's fields around A1111's parameters, with its template's defaults (28 steps, "Euler a")."""

    task_type = fields.String(required=True, validate=validate.OneOf(TASK_TYPES))
    models = ModelsField(required=True)
    sagemaker_endpoint_name = fields.String(required=True, metadata={
        "description": "Worker pool (GET /endpoints) that runs the job"})
    steps = LooseInteger(load_default=None, allow_none=True, validate=SettingRange(1, limit("max_steps")), metadata={
        "description": "Default: the template's 28 for SD 1.x/2.x; the model's default for SDXL, SD3 and Flux"})
    sampler_name = fields.String(load_default=None, allow_none=True, metadata={
        "description": "Default: the template's Euler a (Euler on SD3 and Flux)"})
    sampler_index = fields.String(load_default=None, allow_none=True)

    @validates("sagemaker_endpoint_name")
    def pool_name(self, value: str, **_: Any) -> None:
        check_pool_name(value)


class InferenceRequest(InferenceEnvelope, Txt2ImgRequest):
    """POST /inference/v2 with task_type txt2img."""


class InferenceImg2Img(InferenceEnvelope, Img2ImgRequest):
    """POST /inference/v2 with task_type img2img (init_images, and mask for inpainting)."""


# Instances, not classes: webargs would build (and deep-copy) a schema per request.
TXT2IMG_REQUEST = InferenceRequest()
IMG2IMG_REQUEST = InferenceImg2Img()


class JobQuery(BaseSchema):
    jobID = fields.String(required=True, validate=validate.Length(1, 128), metadata={"description": "Job id"})


# The web UI's interpolation labels (and sdqueue's own names) -> api/merges.py METHODS.
MERGE_METHODS = {"Weighted sum": "weighted_sum", "Add difference": "add_difference",
                 "weighted_sum": "weighted_sum", "add_difference": "add_difference"}


class ModelMergeRequest(BaseSchema):
    """POST /inference/run-model-merge: the three names the extension's WebUI sends, and the merge fields of the
    extension's container payload (the web UI's checkpoint merger); other fields are ignored."""

    primary_model_name = fields.String(required=True, validate=validate.Length(1, 300), metadata={
        "description": "Model A: a model of the model directory, or the file name of one of this key's Active "
                       "Stable-diffusion checkpoints"})
    secondary_model_name = fields.String(required=True, validate=validate.Length(1, 300), metadata={
        "description": "Model B, of A's family"})
    tertiary_model_name = fields.String(load_default="", allow_none=True, validate=validate.Length(max=300), metadata={
        "description": "Model C, for \"Add difference\" (the container's spelling teritary_model_name is read too); "
                       "a weighted sum ignores it with a warning"})
    interp_method = fields.String(load_default="Weighted sum", validate=validate.OneOf(tuple(MERGE_METHODS)),
                                  metadata={"description": "The web UI's interpolation method"})
    interp_amount = StrictFloat(load_default=None, allow_none=True, validate=validate.Range(0, 1), metadata={
        "description": "The multiplier M, 0..1; default 0.3 (the web UI's)"})
    multiplier = StrictFloat(load_default=None, allow_none=True, validate=validate.Range(0, 1), metadata={
        "description": "The same as interp_amount (which wins when both are sent)"})
    custom_name = fields.String(load_default="", allow_none=True, validate=validate.Length(max=180), metadata={
        "description": "The merged file's name without its extension; default: the web UI's, e.g. \"0.7(A) + 0.3(B)\""})
    save_as_half = fields.Boolean(load_default=False, metadata={"description": "Save float16 weights"})
    checkpoint_format = fields.String(load_default="safetensors", validate=validate.OneOf(("safetensors", "ckpt")),
                                      metadata={"description": "sdqueue writes .safetensors (ckpt: with a warning)"})

    @pre_load
    def teritary_spelling(self, data: Any, **_: Any) -> Any:
        """The extension's container payload spells it teritary_model_name."""
        if isinstance(data, dict) and "tertiary_model_name" not in data and "teritary_model_name" in data:
            return {**data, "tertiary_model_name": data["teritary_model_name"]}
        return data


class EndpointCreate(BaseSchema):
    instance_type = fields.String(load_default="", validate=validate.Length(max=64), metadata={
        "description": "Recorded for the deployment (e.g. the GPU type a pool should run on)"})
    initial_instance_count = LooseInteger(load_default=1, validate=validate.Range(0, 1000), metadata={
        "description": "Worker replicas wanted (a string such as \"1\" is accepted)"})
    endpoint_name = fields.String(load_default=None, allow_none=True, metadata={
        "description": "Pool name; default infer-endpoint-<first 7 of the job id>"})
    autoscaling_enabled = fields.Boolean(load_default=True)

    @validates("endpoint_name")
    def pool_name(self, value: str | None, **_: Any) -> None:
        if value is not None:
            check_pool_name(value)


class EndpointDelete(BaseSchema):
    delete_endpoint_list = fields.List(fields.String(), required=True, validate=validate.Length(max=100))


class FileToUpload(BaseSchema):
    filename = fields.String(required=True, metadata={"pattern": FILENAME_PATTERN})
    parts_number = LooseInteger(load_default=1, validate=validate.Range(1, MAX_PARTS))

    @validates("filename")
    def plain_name(self, value: str, **_: Any) -> None:
        if problem := filename_problem(value):
            raise ValidationError(problem)


class CheckpointCreate(BaseSchema):
    checkpoint_type = fields.String(required=True, validate=validate.OneOf(CHECKPOINT_TYPES))
    filenames = fields.List(fields.Nested(FileToUpload), required=True, validate=validate.Length(1, 20))
    params = fields.Dict(load_default=dict, validate=JsonSize(), metadata={
        "description": "Free-form, stored with the checkpoint (at most limits.max_extra_bytes as JSON)"})

    @validates("filenames")
    def distinct(self, value: list[dict], **_: Any) -> None:
        names = [f.get("filename") for f in value if isinstance(f, dict)]
        if len(set(names)) != len(names):
            raise ValidationError("file names must be distinct")
        if sum(f.get("parts_number", 1) for f in value if isinstance(f, dict)) > MAX_PARTS:
            raise ValidationError(f"at most {MAX_PARTS} parts in all per request")


class PartTag(BaseSchema):
    ETag = fields.String(required=True, validate=validate.Length(1, 256))
    PartNumber = LooseInteger(required=True, validate=validate.Range(1, MAX_PARTS))


class CheckpointUpdate(BaseSchema):
    checkpoint_id = fields.String(required=True, validate=validate.Length(1, 64))
    status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    multi_parts_tags = fields.Dict(keys=fields.String(validate=validate.Length(1, 255)),
                                   values=fields.List(fields.Nested(PartTag), validate=validate.Length(max=MAX_PARTS)),
                                   load_default=dict, validate=validate.Length(max=20), metadata={
                                       "description": "file name -> [{ETag, PartNumber}]; omitted: the parts S3 holds"})


class CheckpointQuery(BaseSchema):
    id = fields.String(load_default=None, validate=validate.Length(max=64), metadata={"description": "Checkpoint id"})
    checkpoint_id = fields.String(load_default=None, validate=validate.Length(max=64),
                                  metadata={"description": "Same as id"})


class CheckpointsQuery(BaseSchema):
    status = fields.List(fields.String(validate=validate.OneOf(STATUSES)), load_default=list)
    types = fields.List(fields.String(validate=validate.OneOf(CHECKPOINT_TYPES)), load_default=list)


class UploadCheckpoint(BaseSchema):
    checkpointType = fields.String(required=True, validate=validate.OneOf(CHECKPOINT_TYPES))
    modelUrl = fields.List(fields.Url(schemes={"http", "https"}, require_tld=False), required=True,
                           validate=validate.Length(1, 10))
    params = fields.Dict(load_default=dict, validate=JsonSize(), metadata={
        "description": "Free-form, stored with the checkpoint (at most limits.max_extra_bytes as JSON)"})


# --- datasets ----------------------------------------------------------------------------------
class ExtensionDatasetFile(BaseSchema):
    filename = fields.String(required=True, validate=validate.Length(1, 1024), metadata={
        "description": "The file on the client's side (its last path part names the file when `name` is absent)"})
    name = fields.String(load_default=None, metadata={"description": "The file's name in the dataset: an image "
                                                                     "(.png .jpg .jpeg .webp) or a caption (.txt)"})
    type = fields.String(load_default=None, validate=validate.Length(max=32), metadata={
        "description": "The file's type as the client sees it (png, txt, ...); informative"})
    params = fields.Dict(load_default=dict, validate=JsonSize())

    @validates_schema
    def plain_name(self, data: dict, **_: Any) -> None:
        name = data.get("name") or data["filename"].replace("\\", "/").rsplit("/", 1)[-1]
        if problem := item_name_problem(name):
            raise ValidationError(problem, field_name="name")
        data["name"] = name


class ExtensionDatasetCreate(BaseSchema):
    dataset_name = fields.String(required=True)
    content = fields.List(fields.Nested(ExtensionDatasetFile), required=True, validate=validate.Length(min=1))
    params = fields.Dict(load_default=dict, validate=JsonSize())

    @validates("dataset_name")
    def plain(self, value: str, **_: Any) -> None:
        if problem := dataset_name_problem(value):
            raise ValidationError(problem)


class ExtensionDatasetUpdate(BaseSchema):
    dataset_name = fields.String(required=True, validate=validate.Length(1, 100))
    status = fields.String(required=True, validate=validate.OneOf(DATASET_STATUSES))


class ExtensionDatasetsQuery(BaseSchema):
    dataset_status = fields.List(fields.String(validate=validate.OneOf(DATASET_STATUSES)), load_default=list)


# --- training jobs and their base models (the extension's first training API) -----------------------
MODEL_UPLOAD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".safetensors", ".ckpt")
TRAIN_TYPES_OF_LORA = ("dreambooth", "kohya")


def dict_entries(*names: str) -> Callable[[dict], None]:
    """A validator: each of these entries of a free-form dict, when present, is a JSON object."""
    def check(value: dict) -> None:
        wrong = [name for name in names if name in value and not isinstance(value[name], dict)]
        if wrong:
            raise ValidationError({name: ["must be a JSON object"] for name in wrong})
    return check


def plain_upload_name(suffixes: tuple[str, ...]) -> Callable[[str], None]:
    """A validator: a plain file name (as checkpoint files are named) with one of these suffixes."""
    def check(value: str) -> None:
        if not CHECKPOINT_FILENAME.match(value) or ".." in value:
            raise ValidationError(f"{value!r} is not a plain file name (letters, digits, ' ._-()+[]', at most 200)")
        if not value.lower().endswith(suffixes):
            raise ValidationError(f"{value!r} must end in one of {', '.join(suffixes)}")
    return check


class TrainJobCreate(BaseSchema):
    """POST /train: a LoRA training job in Initial (PUT /train starts it)."""

    train_type = fields.String(required=True, validate=validate.Length(1, 64), metadata={
        "description": "Recorded and echoed (the extension sends Stable-diffusion, or Lora for LoRA jobs)"})
    model_id = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=64), metadata={
        "description": "A Complete model of this key (POST /model) to train on; kohya: training_params.s3_model_path"})
    params = fields.Dict(required=True, validate=[JsonSize(), dict_entries("training_params", "config_params")],
                         metadata={"description": "{training_params: {data_tar_list | s3_data_path, s3_model_path?, "
                                                  "class_data_tar_list?, training_instance_type?}, config_params: "
                                                  "{concepts_list, model_name | output_name, num_train_epochs, "
                                                  "use_lora, ...}}: docs/compat/aws-extension.md says what is used; "
                                                  "stored and echoed"})
    filenames = fields.List(fields.String(validate=plain_upload_name(FILE_SUFFIXES + (".tar", ".json", ".toml"))),
                            load_default=None, allow_none=True, validate=validate.Length(max=20), metadata={
                                "description": "Files the client uploads into the job's input_location (presigned "
                                               "PUT URLs in s3PresignUrl); stored, not read"})
    lora_train_type = fields.String(load_default="dreambooth", validate=validate.OneOf(TRAIN_TYPES_OF_LORA))
    creator = fields.String(load_default="", validate=validate.Length(max=200), metadata={
        "description": "Accepted and ignored (the key is the owner)"})

    @validates("params")
    def training_params_present(self, value: dict, **_: Any) -> None:
        if not isinstance(value.get("training_params"), dict):
            raise ValidationError({"training_params": ["a JSON object is required"]})


class TrainJobUpdate(BaseSchema):
    """PUT /train: {"train_job_id", "status": "Training"} starts an Initial job."""

    train_job_id = fields.String(required=True, validate=validate.Length(1, 64))
    status = fields.String(required=True, validate=validate.Length(1, 64), metadata={
        "description": "Training starts the job; the extension answers other values with a `msg`"})


class TrainJobsQuery(BaseSchema):
    types = fields.List(fields.String(validate=validate.Length(1, 64)), load_default=list, metadata={
        "description": "train_type values to list (repeat the parameter for several)"})
    status = fields.List(fields.String(validate=validate.OneOf(TRAIN_STATUSES)), load_default=list)


class ModelJobFile(BaseSchema):
    filename = fields.String(required=True, validate=plain_upload_name(MODEL_UPLOAD_SUFFIXES), metadata={
        "description": "A .tar (.tar.gz, .tgz) holding a .safetensors or .ckpt checkpoint, or the checkpoint itself"})
    parts_number = LooseInteger(load_default=1, validate=validate.Range(1, MAX_PARTS))


class ModelJobCreate(BaseSchema):
    """POST /model: a base model for training, uploaded (filenames) or naming one (checkpoint_id, ckpt_path)."""

    model_type = fields.String(required=True, validate=validate.OneOf(("Stable-diffusion",)))
    name = fields.String(required=True, validate=validate.Length(1, 100), metadata={
        "description": "Letters, digits and '_.-': the checkpoint made from an upload is {name}.safetensors (or .ckpt)"})
    params = fields.Dict(load_default=dict, validate=[JsonSize(), dict_entries("create_model_params")], metadata={
        "description": "Stored and echoed; create_model_params.ckpt_path may name the model (without filenames)"})
    filenames = fields.List(fields.Nested(ModelJobFile), load_default=list, validate=validate.Length(max=1), metadata={
        "description": "The one file to upload (presigned part URLs in s3PresignUrl)"})
    checkpoint_id = fields.String(load_default="", allow_none=True, validate=validate.Length(max=64), metadata={
        "description": "Instead of filenames: an Active Stable-diffusion checkpoint of this key"})
    creator = fields.String(load_default="", validate=validate.Length(max=200), metadata={
        "description": "Accepted and ignored (the key is the owner)"})

    @validates("name")
    def plain(self, value: str, **_: Any) -> None:
        if problem := dataset_name_problem(value):
            raise ValidationError(problem.replace("dataset name", "model name"))


class ModelJobUpdate(BaseSchema):
    """PUT /model: status Creating completes the upload and makes the model (or Fail)."""

    model_id = fields.String(required=True, validate=validate.Length(1, 64))
    status = fields.String(required=True, validate=validate.OneOf(MODEL_STATUSES))
    multi_parts_tags = fields.Dict(keys=fields.String(validate=validate.Length(1, 255)),
                                   values=fields.List(fields.Nested(PartTag), validate=validate.Length(max=MAX_PARTS)),
                                   load_default=dict, validate=validate.Length(max=20), metadata={
                                       "description": "file name -> [{ETag, PartNumber}]; omitted: the parts S3 holds"})


class ModelJobsQuery(BaseSchema):
    types = fields.List(fields.String(validate=validate.Length(1, 64)), load_default=list)
    status = fields.List(fields.String(validate=validate.OneOf(MODEL_STATUSES)), load_default=list)
