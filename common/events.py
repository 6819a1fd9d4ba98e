"""The JSON of a task's events (docs/events.md), shared by the SSE stream (api/eventstream.py) and webhook events
(worker/webhook.py), so a client sees the same payload on either.

Why here: the API renders events it reads from the task's event log, the
worker renders the ones it sends to a webhook as they happen; both start
from the fields the Lua steps record (strings) and must agree.
"""
from __future__ import annotations

from typing import Any

from common.store import Preview
from common.timestamps import iso

STEP_KINDS = ("progress", "preview")


def queued_data(task_id: str, position: int | None, attempt: int, requeued: bool = False) -> dict:
    data = {"task_id": task_id, "status": "pending", "queue_position": position, "attempt": attempt}
    return {**data, "requeued": True} if requeued else data


def started_data(task_id: str, worker: str | None, model: str | None, attempt: int, started_at: Any) -> dict:
    return {"task_id": task_id, "status": "processing", "worker": worker, "model": model, "attempt": attempt,
            "started_at": iso(float(started_at)) if started_at not in (None, "") else None}


def progress_data(task_id: str, step: int, total: int, eta: Any, loss: Any = None) -> dict:
    """A progress event; a training job's carries its latest `loss` as well."""
    data = {"task_id": task_id, "step": step, "total": total, "fraction": round(step / total, 4) if total else 0.0,
            "eta_seconds": float(eta) if eta not in (None, "") else None}
    return {**data, "loss": float(loss)} if loss not in (None, "") else data


def preview_data(task_id: str, preview: Preview) -> dict:
    return {"task_id": task_id, **preview.to_dict()}


def wanted_events(callback_url: str | None, callback_events: list[str] | None, kinds: tuple[str, ...]) -> set[str]:
    """Which of `kinds` a job's webhook receives (none without a callback_url; the final ones by default)."""
    if not callback_url or not callback_events:
        return set()
    return set(callback_events) & set(kinds)
