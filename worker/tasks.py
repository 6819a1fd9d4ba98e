"""Celery task bodies: thin adapters onto worker.jobs and worker.webhook.

Why thin: tasks take ids and plain values (never objects), and the logic
stays testable without a broker.
"""
from __future__ import annotations

import logging
from typing import Callable

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from celery.utils.time import get_exponential_backoff_interval

from common.errors import TaskNotFound
from common.netguard import Refused, callback_guard
from common.queue import CALLBACK_TASK, CREATE_MODEL_TASK, EVENT_CALLBACK_TASK, GENERATE_TASK
from worker.jobs import JobContext, run_delivery
from worker.modeljob import create_model
from worker.webhook import RetryableDelivery, build_event_payload, build_payload, deliver

log = logging.getLogger("sdqueue.worker")
EVENT_RETRIES = 2


def deliver_task_callback(ctx: JobContext, task_id: str, attempt: int) -> int | None:
    """POST the task's final state to its callback_url; raises RetryableDelivery to retry."""
    try:
        task = ctx.store.get(task_id)
    except TaskNotFound:
        return None
    if not task.spec.callback_url:
        return None
    if task.spec.callback_events and task.status.value not in task.spec.callback_events:
        ctx.store.set_fields(task_id, callback_status=f"not sent: {task.status.value} is not in callback_events")
        return None
    guard = callback_guard(ctx.settings)
    if reason := guard.blocked_reason(task.spec.callback_url):   # the clearer early error; the connect checks again
        ctx.store.set_fields(task_id, callback_status=f"refused: {reason}")
        return None
    urls = [ctx.storage.url_for(k) for k in task.result_keys]
    payload = build_payload(task.id, task.status.value, urls, task.error, task.result)
    try:
        code = deliver(task.spec.callback_url, payload, ctx.settings.callbacks.secret,
                       ctx.settings.callbacks.timeout, attempt + 1, guard)
    except Refused as exc:   # DNS answers a refused address now: final, not retried
        ctx.store.set_fields(task_id, callback_status=f"refused: {exc}")
        return None
    except RetryableDelivery as exc:
        ctx.store.set_fields(task_id, callback_status=f"retrying after attempt {attempt + 1}: {exc}")
        raise
    outcome = "delivered" if code < 400 else "rejected by the receiver (not retried)"
    ctx.store.set_fields(task_id, callback_status=f"{outcome}: HTTP {code} after {attempt + 1} attempt(s)")
    return code


def deliver_event_callback(ctx: JobContext, task_id: str, kind: str, data: dict, attempt: int,
                           delivery: str) -> int | None:
    """POST one intermediate event to the task's callback_url; raises RetryableDelivery to retry.

    The task's callback_status (its final callback's) is left alone; a refused
    URL or a rejecting receiver drops the event.
    """
    try:
        task = ctx.store.get(task_id)
    except TaskNotFound:
        return None
    if not task.spec.callback_url or kind not in (task.spec.callback_events or ()):
        return None
    try:
        return deliver(task.spec.callback_url, build_event_payload(kind, task_id, data), ctx.settings.callbacks.secret,
                       ctx.settings.callbacks.timeout, attempt + 1, callback_guard(ctx.settings),
                       message_id=f"msg_{task_id}_{kind}_{delivery}")
    except Refused as exc:
        log.warning("event webhook of %s refused: %s", task_id, exc)
        return None


def register_tasks(app: Celery, get_context: Callable[[], JobContext]) -> None:
    """Attach the generate, callback and create-model task bodies to `app`."""
    settings = get_context().settings

    # Redis/broker errors (after the client's own retries) are not the job's fault:
    # the delivery is retried rather than acknowledged; the task is idempotent
    # against its hash (pick gives a retried delivery the job it took, finish accepts its own result).
    @app.task(name=GENERATE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
              autoretry_for=(redis.RedisError, OperationalError), retry_backoff=True, retry_backoff_max=60,
              retry_jitter=False, max_retries=None)
    def generate_task(self, task_id: str, attempt: int = 0) -> str:
        ctx = get_context()
        queue = (self.request.delivery_info or {}).get("routing_key") or ctx.info.queues[0]
        return run_delivery(ctx, task_id, int(attempt), queue, self.request.id or "")

    @app.task(name=CALLBACK_TASK, bind=True, acks_late=True, max_retries=settings.callbacks.max_retries)
    def deliver_callback(self, task_id: str) -> int | None:
        ctx = get_context()
        try:
            return deliver_task_callback(ctx, task_id, self.request.retries)
        except RetryableDelivery as exc:
            if self.request.retries >= self.max_retries:
                ctx.store.set_fields(task_id, callback_status=f"failed after {self.request.retries + 1} attempts: {exc}")
                log.error("giving up on callback of %s: %s", task_id, exc)
                return None
            countdown = get_exponential_backoff_interval(
                factor=1, retries=self.request.retries, maximum=settings.callbacks.backoff_max, full_jitter=False)
            raise self.retry(exc=exc, countdown=countdown)

    # Intermediate events are news: a few quick retries, then dropped (the final callback is retried for long).
    @app.task(name=EVENT_CALLBACK_TASK, bind=True, acks_late=True, max_retries=EVENT_RETRIES)
    def deliver_event(self, task_id: str, kind: str, data: dict) -> int | None:
        ctx = get_context()
        try:
            return deliver_event_callback(ctx, task_id, kind, data, self.request.retries, self.request.id or "")
        except RetryableDelivery as exc:
            if self.request.retries >= self.max_retries:
                log.warning("dropping the %s event webhook of %s: %s", kind, task_id, exc)
                return None
            raise self.retry(exc=exc, countdown=self.request.retries + 1)

    # An uploaded model made into its checkpoint (S3 to S3, on the callbacks queue); Redis errors retry it, the
    # rest ends the model in Fail (worker/modeljob.py), and a rerun after Complete changes nothing.
    @app.task(name=CREATE_MODEL_TASK, acks_late=True, autoretry_for=(redis.RedisError,), retry_backoff=True,
              retry_backoff_max=60, max_retries=10)
    def create_model_task(owner: str, model_id: str) -> str | None:
        return create_model(get_context(), owner, model_id)
