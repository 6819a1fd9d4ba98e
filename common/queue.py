"""The Celery app, configured from one dict, shared by senders and workers.

Why here: the API only *sends* tasks (by name, so it never imports worker
code or torch); workers register the task bodies on the same configuration.
"""
from __future__ import annotations

from celery import Celery

GENERATE_TASK = "sdq.generate"
CALLBACK_TASK = "sdq.deliver_callback"

# Seconds beyond the job time limit before the broker redelivers an unacked
# message; the reaper (heartbeats) rescues killed workers' jobs long before.
VISIBILITY_MARGIN = 300


def celery_config(settings) -> dict:
    """Every Celery setting sdqueue relies on, in one place."""
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": settings.tasks.time_limit + VISIBILITY_MARGIN},
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "task_routes": {GENERATE_TASK: {"queue": settings.tasks.queue},
                        CALLBACK_TASK: {"queue": settings.callbacks.queue}},
        "task_default_queue": settings.tasks.queue,
    }


def create_celery(settings, name: str = "sdqueue") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


def send_generate(app: Celery, task_id: str, attempt: int, queue: str) -> None:
    """Enqueue delivery `attempt` of a job (attempt 0 from the API, later ones from the reaper)."""
    celery_id = task_id if attempt == 0 else f"{task_id}-r{attempt}"
    app.send_task(GENERATE_TASK, args=[task_id, attempt], queue=queue, task_id=celery_id)


def send_callback(app: Celery, task_id: str, queue: str) -> None:
    app.send_task(CALLBACK_TASK, args=[task_id], queue=queue, task_id=f"{task_id}-callback")
