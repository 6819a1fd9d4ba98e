"""What can go wrong, as types a caller can catch one by one.

Why types: a script retries a RateLimited, fixes its request on a
ValidationError, and reports a JobFailed; the CLI maps each family to an exit
code. `detail` in the native API is a string, a list of {loc, msg} (422) or a
dict of field -> messages; `render_detail` makes any of them one line.
"""
from __future__ import annotations

from typing import Any, Optional

import httpx


class SdqError(Exception):
    """Everything this package raises."""


class ConnectionProblem(SdqError):
    """The service could not be reached (or the connection kept breaking) after the allowed retries."""


class StreamBroken(ConnectionProblem):
    """The events stream kept dropping before its final event."""


class JobFailed(SdqError):
    """The task ended `failed` or `cancelled`; `task` is its GET /api/v1/tasks/{id} body."""

    def __init__(self, task: dict):
        self.task = task
        self.status = task.get("status", "failed")
        reason = task.get("error_message") or "no reason given"
        super().__init__(f"task {task.get('task_id')} {self.status}: {reason}")


class ApiError(SdqError):
    """An HTTP error answer; `status`, `detail` (as sent), `message` (one line) and the httpx `response`."""

    def __init__(self, status: int, detail: Any, response: Optional[httpx.Response] = None):
        self.status = status
        self.detail = detail
        self.message = render_detail(detail)
        self.response = response
        super().__init__(f"{status} {self.message}")


class BadRequest(ApiError):
    """400, 413: the request could not be read."""


class Unauthorized(ApiError):
    """401: a missing or wrong API key."""


class Forbidden(ApiError):
    """403: the key may not use this API, model or priority."""


class NotFound(ApiError):
    """404: no such task for this key, or no such route (an older server)."""


class MethodNotAllowed(ApiError):
    """405: the route exists without this method (an older server)."""


class Conflict(ApiError):
    """409: e.g. cancelling a task that already ended."""


class ValidationError(ApiError):
    """422: fields the server refused; `message` names each."""


class RateLimited(ApiError):
    """429 after the retries ran out."""


class Unavailable(ApiError):
    """503 after the retries ran out: queue full, store down, no model yet."""


class ServerError(ApiError):
    """Any other 5xx."""


ERRORS_BY_STATUS = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 405: MethodNotAllowed,
                    409: Conflict, 413: BadRequest, 422: ValidationError, 429: RateLimited, 503: Unavailable}


def render_detail(detail: Any) -> str:
    """Any `detail` shape as one readable line: `width: must be a multiple of 8; prompt: field required`."""
    if isinstance(detail, str):
        return " ".join(detail.split())
    if isinstance(detail, list):
        return "; ".join(render_item(item) for item in detail) or "error"
    if isinstance(detail, dict):
        return "; ".join(f"{name}: {render_messages(value)}" for name, value in flatten_fields(detail))
    return "error" if detail is None else str(detail)


def render_item(item: Any) -> str:
    """One pydantic-style {loc, msg} entry; the location without its leading "body"."""
    if not isinstance(item, dict):
        return render_detail(item)
    loc = [str(p) for p in item.get("loc") or []]
    if loc and loc[0] in ("body", "query", "path"):
        loc = loc[1:]
    msg = render_detail(item.get("msg", item))
    return f"{'.'.join(loc)}: {msg}" if loc else msg


def flatten_fields(detail: dict, prefix: str = "") -> list:
    """{"a": {"b": ["m"]}} -> [("a.b", ["m"])]: nested field dicts name their leaf."""
    out = []
    for key, value in detail.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out += flatten_fields(value, name)
        else:
            out.append((name, value))
    return out


def render_messages(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(render_detail(v) for v in value)
    return render_detail(value)


def error_for(response: httpx.Response) -> ApiError:
    """The ApiError for an error response, whatever its body (JSON detail, text, nothing)."""
    try:
        body = response.json()
        detail = body.get("detail", body) if isinstance(body, dict) else body
    except ValueError:
        detail = response.text.strip() or response.reason_phrase
    status = response.status_code
    kind = ERRORS_BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return kind(status, detail, response)
