"""Submitting a canonical job and (for synchronous dialects) waiting for it.

Why shared: every dialect ends in the same two steps, so backpressure, ids,
idempotency and the wait on the event hub are written once.
"""
from __future__ import annotations

import random
import uuid

from api.services import Services
from common.events import queued_data, wanted_events
from common.jobspec import JobSpec
from common.queue import send_event_callback
from common.store.tasks import Task


class SyncTimeout(Exception):
    """A synchronous call's job did not finish within api.sync_timeout (it still runs)."""


def resolve_seed(seed: int | None) -> int:
    """A request without a seed (or -1) gets a random one, recorded in the task.

    Not a secret, so no syscall per request: `random` is reseeded in each forked worker.
    """
    return random.getrandbits(32) if seed is None or seed < 0 else seed


def new_task_id() -> str:
    return str(uuid.uuid4())


def submit_job(svc: Services, owner: str, spec: JobSpec, task_id: str | None = None, queue: str | None = None) -> str:
    """Write the pending task and its queue message atomically; returns the task id.

    With a caller-chosen task_id that exists already, nothing is written and
    the existing id is returned (idempotent resubmission). `queue`: a worker
    pool's queue (default: the key's own, api.keys[].queue, else tasks.queue). Raises QueueFull (nothing written)
    beyond tasks.max_pending waiting jobs in the queue, or the key's own
    max_pending (api.keys[].max_pending, default tasks.max_pending_per_key),
    checked inside the same atomic write. A key limited to some priorities
    (api.keys[].priorities) gets its own default in dialects without the field.
    """
    task_id = task_id or new_task_id()
    queue = queue or svc.keys.queue_for(owner) or svc.settings.tasks.queue
    spec.priority = svc.keys.priority_for(owner, spec.priority)   # the native API refused a forbidden one already
    created = svc.store.create(task_id, owner, spec, queue, svc.messages.generate(task_id, 0, queue),
                               svc.settings.tasks.max_pending, svc.keys.max_pending(owner))
    if created and wanted_events(spec.callback_url, spec.callback_events, ("queued",)):
        position = svc.store.queue_position(svc.store.get(task_id))
        send_event_callback(svc.celery, task_id, "queued", queued_data(task_id, position, 0), svc.settings.callbacks.queue)
    return task_id


def wait_until_terminal(svc: Services, task_id: str, timeout: float, required: bool = False) -> bool:
    """Block (on the event hub, not a polling loop) up to `timeout` s until the task ends.

    `required`: raise WaitersFull rather than answer at once when every wait slot is taken.
    """
    return svc.waits.wait_until(task_id, timeout, lambda: svc.store.get(task_id).status.terminal, required)


def wait_for_result(svc: Services, task_id: str, timeout: float | None = None) -> Task:
    """Wait for a synchronous call's job to end; its final state."""
    timeout = svc.settings.api.sync_timeout if timeout is None else timeout
    if not wait_until_terminal(svc, task_id, timeout, required=True):
        raise SyncTimeout(f"task {task_id} did not finish within {timeout:g} s; it is still queued or running")
    return svc.store.get(task_id)
