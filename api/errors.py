"""Every error is JSON in the native API's shape: {"detail": ...}.

Why: the native API documents `{"detail": "..."}` and, for validation, the list
form `[{"loc", "msg", "type"}]`; clients parse those. No HTML error page
and no 500 for anything a client can send.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from flask import jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("sdqueue.api")

_MISSING = "Missing data for required field."
_TYPES = {
    _MISSING: ("field required", "value_error.missing"),
    "Field may not be null.": ("none is not an allowed value", "type_error.none.not_allowed"),
    "Not a valid integer.": ("value is not a valid integer", "type_error.integer"),
    "Not a valid number.": ("value is not a valid float", "type_error.float"),
    "Not a valid string.": ("str type expected", "type_error.str"),
    "Not a valid list.": ("value is not a valid list", "type_error.list"),
    "Invalid input type.": ("value is not a valid dict", "type_error.dict"),
}
_LOCATIONS = {"json": "body", "query": "query", "view_args": "path", "headers": "header"}


def flatten_messages(messages: Any, loc: list) -> list[dict]:
    """marshmallow's nested message dict -> pydantic-style [{loc, msg, type}]."""
    if isinstance(messages, dict):
        out = []
        for key, value in messages.items():
            sub = loc if key == "_schema" else loc + [list_index(key)]
            out += flatten_messages(value, sub)
        return out
    if isinstance(messages, (list, tuple)):
        if messages and all(isinstance(m, str) for m in messages):
            return [_entry(loc, m) for m in messages]
        out = []
        for item in messages:
            out += flatten_messages(item, loc)
        return out
    return [_entry(loc, str(messages))]


def list_index(key: Any) -> Any:
    """A list item's index as an int ("3" from a dict of items too); any other key as it came. ASCII digits
    only: "¹" and "٣" are str.isdigit() but int() refuses the one and would misname the other."""
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    return key


def _entry(loc: list, message: str) -> dict:
    msg, kind = _TYPES.get(message, (message, "value_error"))
    return {"loc": loc, "msg": msg, "type": kind}


def validation_detail(messages: dict) -> list[dict]:
    """Messages keyed by webargs location ("json", "query") -> detail list."""
    out = []
    for location, fields_ in messages.items():
        out += flatten_messages(fields_, [_LOCATIONS.get(location, location)])
    return out


Renderer = Callable[[int, Any, "dict | None"], Any]
# blueprint name -> how that dialect's clients expect errors (registered by the dialect module)
DIALECT_RENDERERS: dict[str, Renderer] = {}


def json_error(status: int, body: Any, headers: dict | None = None):
    """A JSON error response with its status and headers; every dialect's shape is built on it."""
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def error_response(status: int, detail: Any, headers: dict | None = None):
    return json_error(status, {"detail": detail}, headers)


def detail_text(detail: Any) -> Any:
    """A validation list [{loc, msg}] as one line naming each field, for dialects whose errors are text."""
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in detail)
    return detail


def dialect_error(status: int, detail: Any, headers: dict | None = None):
    """An error in the shape of the dialect that serves this request (the native API's by default)."""
    render = DIALECT_RENDERERS.get(request.blueprint or "", error_response)
    return render(status, detail, headers)


def http_error(error: HTTPException):
    """Render any werkzeug/flask-smorest HTTP error in the serving dialect's shape."""
    data = getattr(error, "data", None) or {}
    messages = data.get("messages") or data.get("errors")   # webargs' messages, or abort(..., errors=...)
    code = error.code or 500
    headers = dict(data.get("headers") or {})
    if code == 429:
        from api.limits import retry_after
        headers["Retry-After"] = retry_after(error)
        return dialect_error(429, f"Too many requests: rate limit {getattr(error, 'description', '')} for this API key",
                             headers)
    if code == 422 and isinstance(messages, dict):
        return dialect_error(422, validation_detail(messages), headers)
    if code == 400 and isinstance(messages, dict) and "json" in messages:
        return dialect_error(400, "Malformed JSON body: the request body must be a valid JSON object")
    detail = data.get("message") or getattr(error, "description", None) or error.name
    return dialect_error(code, detail, headers)


def unexpected_error(error: Exception):
    """Last resort: log it, answer 500 without internals."""
    log.exception("unhandled error: %s", error)
    return dialect_error(500, "Internal server error")
