"""The AWS SD extension API's error shapes.

Why: its routes sit behind API Gateway, which answers auth failures and
throttling itself as {"message": ...}; the inference API raises FastAPI's
{"detail": ...}; the model API answers {"statusCode", "error"}.
"""
from __future__ import annotations

from typing import Any

from api.errors import DIALECT_RENDERERS, detail_text, error_response, json_error


DIALECT = "aws"
INFERENCE_BLUEPRINT = "aws_inference"
CHECKPOINTS_BLUEPRINT = "aws_models"


def gateway_error(status: int, detail: Any, headers: dict | None = None):
    """API Gateway answers throttling and auth itself, as {"message": ...}."""
    return json_error(status, {"message": detail}, headers)


def inference_error(status: int, detail: Any, headers: dict | None = None):
    if status == 429:
        return gateway_error(429, "Too Many Requests", headers)
    return error_response(status, detail, headers)


def models_error(status: int, detail: Any, headers: dict | None = None):
    """{"statusCode": N, "error": "..."} with the same HTTP status; validation lists become one line."""
    if status == 429:
        return gateway_error(429, "Too Many Requests", headers)
    status = 400 if status == 422 else status
    return json_error(status, {"statusCode": status, "error": detail_text(detail)}, headers)


DIALECT_RENDERERS[INFERENCE_BLUEPRINT] = inference_error
DIALECT_RENDERERS[CHECKPOINTS_BLUEPRINT] = models_error


def forbidden():
    return gateway_error(403, "Forbidden")


def not_allowed():
    return gateway_error(403, "this API key may not use the AWS extension API")
