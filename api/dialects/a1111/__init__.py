"""The AUTOMATIC1111 web UI API (`/sdapi/v1`).

Public: `blp`, and what the dialects that carry A1111 parameters (SD on EKS,
the AWS SD extension API) reuse: the request schemas and the translation.
"""
from api.dialects.a1111.fields import Refusal
from api.dialects.a1111.routes import blp, controlnet_blp
from api.dialects.a1111.schemas import ImageList, Img2ImgRequest, Txt2ImgRequest
from api.dialects.a1111.translate import build_a1111_jobspec, echo_parameters, find_checkpoint, screen_fields

__all__ = ["ImageList", "Img2ImgRequest", "Refusal", "Txt2ImgRequest", "blp", "controlnet_blp", "build_a1111_jobspec", "echo_parameters",
           "find_checkpoint", "screen_fields"]
