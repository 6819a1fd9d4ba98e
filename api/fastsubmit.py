"""The well-formed native submission, answered without Flask's request machinery.

Why: POST /api/v1/generate is the one route whose rate decides how fast a
deployment can take work in, and Flask's per-request context, routing and
response objects cost about as much CPU as the submission's own work
(validation plus one Redis call). This WSGI layer serves only the case it
can answer exactly as the Flask route would (a known key, a JSON body the
same schema accepts, no init image, no rate limit in force) through the same
schema, job-spec builder and submit_job; every other request, and every
refusal, reaches the Flask app untouched (its body re-attached), so errors,
401/403/413/422/503 and their shapes are written once, in Flask.
"""
from __future__ import annotations

import io
import time
from typing import Any, Callable, Iterable

import orjson
import redis
from kombu.exceptions import OperationalError
from marshmallow import Schema, ValidationError
from werkzeug.exceptions import HTTPException

from api.auth import ApiKey
from api.limits import key_limit
from common.errors import QueueFull
from api.services import Services, done_serving, serve_with
from api.submission import new_task_id, submit_job

IDEMPOTENCY_ENVIRON = "HTTP_IDEMPOTENCY_KEY"
ROUTE = "/api/v1/generate"
TASK_ID_ENVIRON = "sdqueue.task_id"   # the id a fast attempt chose, reused by the Flask route
JSON_TYPES = ("application/json",)
HEADERS = [("Content-Type", "application/json")]


class FastSubmit:
    """WSGI middleware in front of the Flask app for the native submission route."""

    def __init__(self, app: Callable, svc: Services, schema: Schema,
                 build: Callable[[dict, Services, ApiKey], Any], created: Callable[[str], dict],
                 observe: Callable[[float], None] | None = None):
        self.app = app
        self.observe = observe or _unobserved   # api/metrics.py: one pre-bound histogram observe per answer
        self.svc = svc
        self.schema = schema
        self.build = build
        self.created = created
        self.header_env = "HTTP_" + svc.settings.api.key_header.upper().replace("-", "_")
        self.max_body = svc.settings.api.max_body_bytes

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != ROUTE or environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        if self.svc.keys.match(environ.get(self.header_env)) is None:
            return self.app(environ, start_response)   # no body is read for a request without a valid key
        started = time.perf_counter()
        body = self.read_body(environ)
        if body is not None:
            answer = self.try_submit(environ, body)
            if answer is not None:
                start_response("202 ACCEPTED", HEADERS + [("Content-Length", str(len(answer)))])
                self.observe(time.perf_counter() - started)
                return [answer]
            environ["wsgi.input"] = io.BytesIO(body)
        return self.app(environ, start_response)

    def read_body(self, environ: dict[str, Any]) -> bytes | None:
        """The JSON body when its length is declared and within api.max_body_bytes; None leaves it unread.

        Whatever is read is handed to Flask if the fast path does not answer.
        """
        mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            return None
        if mimetype not in JSON_TYPES or not 0 < length <= self.max_body:
            return None
        return environ["wsgi.input"].read(length)   # a short body fails to parse and goes to Flask as read

    def try_submit(self, environ: dict[str, Any], body: bytes) -> bytes | None:
        """Submit and return the 202 body, or None (nothing written) for the Flask route to answer."""
        if IDEMPOTENCY_ENVIRON in environ:   # a retried submission may answer with its first task: Flask's route
            return None
        key = self.svc.keys.match(environ.get(self.header_env))
        if key is None or not key.may_use_dialect("native") or self.limited(key):
            return None
        serving = serve_with(self.svc)   # the schema's bounds and validators read services()
        try:
            data = self.schema.load(orjson.loads(body))
            if data["init_image"] is not None or data.get("controlnet"):   # images to store: Flask's route
                return None
            spec = self.build(data, self.svc, key)
            task_id = new_task_id()
            environ[TASK_ID_ENVIRON] = task_id
            submit_job(self.svc, key.owner, spec, task_id)
        except (ValueError, ValidationError, HTTPException, QueueFull, redis.RedisError, OperationalError):
            # orjson's JSONDecodeError is a ValueError; Flask renders every refusal. After a Redis
            # error the Flask route retries under the same task id: idempotent if the write landed.
            return None
        finally:
            done_serving(serving)
        return orjson.dumps(self.created(task_id)) + b"\n"

    def limited(self, key: ApiKey) -> bool:
        """A submit rate limit applies to this key: Flask-Limiter (in the Flask route) must count it."""
        return bool(key_limit(self.svc.settings, key, "submit_limit"))


def _unobserved(seconds: float) -> None:
    """No metrics wired (FastSubmit built without an observer)."""
