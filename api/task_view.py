"""Task hash -> the native API's task JSON (seed 002's fields plus progress).

Why separate: the native GET, the listing, cancel and the A1111/other
dialects all render tasks; the URL policy (presigned or public) lives here once.
"""
from __future__ import annotations

from datetime import datetime, timezone

from common.storage import Storage
from common.store.tasks import Task, TaskStatus, TaskStore


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> '2024-01-01T12:00:00' (UTC), seed 002's format."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds")


def image_urls(task: Task, storage: Storage) -> list[str]:
    return [storage.url_for(key) for key in task.result_keys]


def render_task(task: Task, storage: Storage, store: TaskStore) -> dict:
    urls = image_urls(task, storage) if task.status is TaskStatus.COMPLETED else []
    total = task.progress_total
    return {
        "task_id": task.id,
        "status": task.status.value,
        "result_url": urls[0] if len(urls) == 1 else None,
        "result_urls": urls if len(urls) > 1 else None,
        "error_message": task.error if task.status in (TaskStatus.FAILED, TaskStatus.CANCELLED) else None,
        "created_at": iso(task.created_at),
        "updated_at": iso(task.updated_at),
        "progress": {"step": task.progress_step, "total": total,
                     "fraction": round(task.progress_step / total, 4) if total else 0.0},
        "queue_position": store.queue_position(task),
        "priority": task.spec.priority,
        "seeds": task.seeds or task.spec.seeds,
        "model": task.spec.model,
        "num_images": task.spec.num_images,
    }
