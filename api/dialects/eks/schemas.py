"""SD on EKS's request schemas: A1111's parameters with the `alwayson_scripts` envelope required."""
from __future__ import annotations

import re
from typing import Any

from marshmallow import INCLUDE, ValidationError, fields, validate, validates, validates_schema

from api.dialects.a1111 import ImageList, Img2ImgRequest, Txt2ImgRequest
from api.schemas import BaseSchema, JsonSize


TASKS = {"text-to-image": "txt2img", "image-to-image": "img2img"}
ID_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
SAVE_DIR_PATTERN = re.compile(r"^[A-Za-z0-9_.\-/]{1,256}$")
MAX_LINKS = 16
MAX_UID = 256


class AlwaysOnScripts(BaseSchema):
    """The envelope (task, model, id, folder, links); other keys are the web UI's alwayson scripts, kept so that
    one that is on is refused by name (api/dialects/a1111/fields.py) rather than dropped."""

    class Meta:
        unknown = INCLUDE

    task = fields.String(required=True, validate=validate.OneOf(list(TASKS)))
    sd_model_checkpoint = fields.String(required=True)
    id_task = fields.Raw(required=True, metadata={
        "description": "Client-chosen job id; resubmitting it creates no second job",
        "anyOf": [{"type": "string", "pattern": ID_PATTERN.pattern}, {"type": "integer", "minimum": 0}]})
    uid = fields.Raw(load_default=None, metadata={"description": "The client's user id, echoed back (at most 256 characters)"})
    save_dir = fields.String(load_default="outputs", metadata={"pattern": SAVE_DIR_PATTERN.pattern})
    image_link = fields.String(load_default=None, allow_none=True)

    @validates("id_task")
    def plain_id(self, value: Any, **_: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not ID_PATTERN.match(str(value)):
            raise ValidationError("id_task must be letters, digits, '-', '_' or '.' (at most 128)")

    @validates("uid")
    def plain_uid(self, value: Any, **_: Any) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))
                                  or len(str(value)) > MAX_UID):
            raise ValidationError(f"uid must be a string or an integer of at most {MAX_UID} characters")

    @validates("save_dir")
    def plain_dir(self, value: str, **_: Any) -> None:
        if not SAVE_DIR_PATTERN.match(value) or ".." in value.split("/") or value.startswith("/"):
            raise ValidationError("save_dir must be a relative path of letters, digits, '-', '_', '.', '/'")

    @validates("image_link")
    def plain_links(self, value: str | None, **_: Any) -> None:
        if len(links_of(value)) > MAX_LINKS:
            raise ValidationError(f"at most {MAX_LINKS} links")
        for link in links_of(value):
            if not link.startswith(("http://", "https://", "s3://")):
                raise ValidationError(f"{link[:80]!r}: image_link is a comma-separated list of http(s):// or s3:// URLs")


ENVELOPE = frozenset(AlwaysOnScripts._declared_fields)   # alwayson_scripts keys that are SD on EKS's own


def links_of(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


class EksTxt2Img(Txt2ImgRequest):
    """A text-to-image job."""

    alwayson_scripts = fields.Nested(AlwaysOnScripts, required=True, validate=JsonSize())


class EksImg2Img(Img2ImgRequest):
    """An image-to-image job: init_images, or URLs in alwayson_scripts.image_link."""

    alwayson_scripts = fields.Nested(AlwaysOnScripts, required=True, validate=JsonSize())
    init_images = ImageList(load_default=list, metadata={
        "description": "Base64 images; or give alwayson_scripts.image_link (URLs fetched by sdqueue)"})

    @validates_schema
    def some_image(self, data: dict, **_: Any) -> None:
        if not data.get("init_images") and not links_of((data.get("alwayson_scripts") or {}).get("image_link")):
            raise ValidationError("image-to-image needs init_images or alwayson_scripts.image_link",
                                  field_name="init_images")


# Instances, not classes: webargs would build (and deep-copy) a schema per request.
TXT2IMG_REQUEST = EksTxt2Img()
IMG2IMG_REQUEST = EksImg2Img()
