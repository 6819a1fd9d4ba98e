"""Structured logs: one JSON object per line (or readable text), with the job it is about.

Why: at scale logs are read by a collector (Loki, CloudWatch, Elasticsearch),
not by eye: one JSON object per line, with `task_id`, `worker` and `model`
as fields, lets an operator pull every line about one job from every
process that touched it. `logs.format: text` keeps the old readable lines.

Fields: ts (UTC, ISO 8601), level, logger, msg, pid, plus every `extra=`
field of the call, plus the current log context: `log_context(task_id=...,
model=...)` around a job (a contextvar: the thread or task it is set in
only), and process-wide fields such as the worker name
(`set_process_context(worker=...)`). An `extra=` field wins over the
context. Exceptions are in `exc`.
"""
from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator, TextIO

FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
CONTEXT_FIELDS = ("task_id", "worker", "model")

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("sdq_log_context", default={})
_process: dict[str, Any] = {}
# Attributes every LogRecord has: anything else on a record came from `extra=` (or our context).
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields (task_id=, model=, worker=, ...) to every log line written inside the block.

    Nested blocks add to the outer one; None values are left out.
    """
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def set_process_context(**fields: Any) -> None:
    """Fields for every line of this process (e.g. worker=name); None removes one."""
    for key, value in fields.items():
        if value is None:
            _process.pop(key, None)
        else:
            _process[key] = value


def current_context() -> dict[str, Any]:
    return {**_process, **_context.get()}


class ContextFilter(logging.Filter):
    """Copies the log context onto each record (fields given with `extra=` are kept)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in current_context().items():
            if key not in record.__dict__:
                setattr(record, key, value)
        return True


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The `extra=` and context fields of a record."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")}


def utc_iso(created: float) -> str:
    seconds = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, pid, the record's extra/context fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": utc_iso(record.created), "level": record.levelname, "logger": record.name,
                               "msg": record.getMessage(), "pid": record.process}
        doc.update(record_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, with the job's context appended: `... [task_id=... model=...]`."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tags = " ".join(f"{k}={record.__dict__[k]}" for k in CONTEXT_FIELDS if k in record.__dict__)
        if not tags:
            return line
        head, sep, rest = line.partition("\n")   # tags on the message line, before a traceback
        return f"{head} [{tags}]{sep}{rest}"


def make_formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"logs.format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def make_handler(fmt: str, stream: TextIO | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(make_formatter(fmt))
    handler.addFilter(ContextFilter())
    return handler


def configure_logging(fmt: str = "json", level: str | int = "INFO", stream: TextIO | None = None,
                      **process_fields: Any) -> logging.Handler:
    """Send the root logger (and so every library's) to one handler in `fmt`; replaces earlier handlers."""
    handler = make_handler(fmt, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)
    set_process_context(**process_fields)
    return handler


# --- Celery -------------------------------------------------------------------
_task_tokens: dict[str, contextvars.Token] = {}


def install_celery_logging(level: str | int = "INFO") -> None:
    """Keep our logging in a Celery worker, and tag each task's lines with its task id.

    A `setup_logging` receiver stops Celery from replacing the root logger's
    handlers (and from redirecting stdout). Every sdqueue task takes the
    task id as its first argument: task_prerun puts it in the log context
    until task_postrun, so Celery's own lines and ours carry it.
    """
    from celery import signals

    def keep_ours(loglevel=None, **_: Any) -> None:
        logging.getLogger().setLevel(level.upper() if isinstance(level, str) else level)

    def task_started(task_id: str | None = None, args: Any = None, kwargs: Any = None, **_: Any) -> None:
        ours = args[0] if args and isinstance(args[0], str) else (kwargs or {}).get("task_id")
        if task_id and isinstance(ours, str):
            _task_tokens[task_id] = _context.set({**_context.get(), "task_id": ours})

    def task_ended(task_id: str | None = None, **_: Any) -> None:
        token = _task_tokens.pop(task_id, None) if task_id else None
        if token is not None:
            try:
                _context.reset(token)
            except ValueError:   # set in another context (cannot happen with solo or thread pools)
                pass

    signals.setup_logging.connect(keep_ours, weak=False)
    signals.task_prerun.connect(task_started, weak=False)
    signals.task_postrun.connect(task_ended, weak=False)


# --- gunicorn -------------------------------------------------------------------
def gunicorn_logger_class() -> type:
    """A gunicorn Logger writing its error log and access log as JSON (one object per request).

    The access line is built from a handful of fields (method, path, status,
    bytes, duration) instead of gunicorn's atoms dict of every header and
    environ variable. With logs.format text gunicorn keeps its own logger.
    """
    from gunicorn import glogging

    class JsonGunicornLogger(glogging.Logger):
        def setup(self, cfg) -> None:
            super().setup(cfg)
            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    handler.setFormatter(JsonFormatter())
                    if not any(isinstance(f, ContextFilter) for f in handler.filters):
                        handler.addFilter(ContextFilter())

        def access(self, resp, req, environ, request_time) -> None:
            if not self.access_log_enabled:
                return
            try:
                status = resp.status
                status = int(status.split(None, 1)[0]) if isinstance(status, str) else status
                method, path = environ.get("REQUEST_METHOD"), environ.get("RAW_URI") or environ.get("PATH_INFO")
                self.access_log.info("%s %s %s", method, path, status, extra={
                    "method": method, "path": path, "status": status, "bytes": getattr(resp, "sent", None),
                    "duration_ms": round(request_time.total_seconds() * 1000, 3),
                    "remote": environ.get("REMOTE_ADDR")})
            except Exception:  # noqa: BLE001 - as gunicorn's own access(): never fail a request for a log line
                self.error("access log failed", exc_info=True)

    return JsonGunicornLogger
