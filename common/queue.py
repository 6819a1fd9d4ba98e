"""The Celery app, configured from one dict, shared by senders and workers.

Why here: the API only *sends* tasks (by name, so it never imports worker
code or torch); workers register the task bodies on the same configuration.
"""
from __future__ import annotations

import base64
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from celery import Celery

log = logging.getLogger("sdqueue.queue")

GENERATE_TASK = "sdq.generate"
CALLBACK_TASK = "sdq.deliver_callback"
EVENT_CALLBACK_TASK = "sdq.deliver_event"     # a task's intermediate event, to its webhook (callback_events)
CREATE_MODEL_TASK = "sdq.create_model"         # an AWS-extension model's upload made into a checkpoint (worker/modeljob.py)

# Seconds beyond the job time limit before the broker redelivers an unacked
# message; the reaper (heartbeats) rescues killed workers' jobs long before.
VISIBILITY_MARGIN = 300

# Message priorities kombu's virtual transports accept (sdqueue orders jobs by
# its own priority classes, in Redis; broker messages use 0).
MIN_PRIORITY, MAX_PRIORITY = 0, 9


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
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "task_routes": {GENERATE_TASK: {"queue": settings.tasks.queue},
                        CALLBACK_TASK: {"queue": settings.callbacks.queue},
                        EVENT_CALLBACK_TASK: {"queue": settings.callbacks.queue},
                        CREATE_MODEL_TASK: {"queue": settings.callbacks.queue}},
        "task_default_queue": settings.tasks.queue,
    }


def create_celery(settings, name: str = "sdqueue") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


def celery_task_id(task_id: str, attempt: int) -> str:
    """Celery's id for a delivery: the task id, suffixed for redeliveries."""
    return task_id if attempt == 0 else f"{task_id}-r{attempt}"


@dataclass(frozen=True)
class BrokerMessage:
    """A Celery task message ready to be pushed onto a Redis list."""

    list_key: str
    payload: str


class MessageBuilder:
    """Builds exactly the message `send_task` would publish on the Redis transport.

    Why: the API writes a new task's hash and its queue message in one Redis
    call, so a submission is atomic (never a hash without a message or the
    reverse) and costs one round trip. So the API cannot let Celery publish
    (kombu would LPUSH on its own connection); it needs the message's bytes.
    A template is made once per task name, queue and priority; each
    submission only fills in its ids, arguments and delivery tag (tests
    compare the result with what `send_task` writes).

    How the template is made, with public Celery/kombu calls only (no
    `channel._inplace_augment_message`, `channel._q_for_pri`): Celery's
    `send_task` publishes one real message for that name, queue and priority
    through a kombu connection with a scratch `global_keyprefix` (a documented
    Redis transport option), so it lands beside the real queue's lists where
    no worker reads it; the builder pops it and keeps it. It is popped from
    the list that the documented Redis priority scheme names (see
    `redis_list_key`), so finding it there also checks that scheme against the
    installed kombu at the first submission. This costs a connection and two
    Redis commands once per template; `build` does no Redis call at all.
    """

    def __init__(self, app: Celery):
        self.app = app
        self._templates: dict[tuple[str, str, int], dict] = {}

    def generate(self, task_id: str, attempt: int, queue: str, priority: int = 0) -> BrokerMessage:
        return self.build(GENERATE_TASK, celery_task_id(task_id, attempt), [task_id, attempt], queue, priority)

    def build(self, name: str, celery_id: str, args: list, queue: str, priority: int = 0) -> BrokerMessage:
        template = self._template(name, queue, priority)
        headers = {**template["headers"], "id": celery_id, "root_id": celery_id, "argsrepr": repr(args)}
        properties = {**template["properties"], "correlation_id": celery_id, "delivery_tag": str(uuid.uuid4()),
                      "delivery_info": dict(template["properties"]["delivery_info"])}
        # The same bytes kombu's json serializer writes for (args, kwargs, embed), without its registry.
        body = "[" + json.dumps(args) + ", {}, " + template["embed_json"] + "]"
        message = {**template["envelope"], "headers": headers, "properties": properties,
                   "body": base64.b64encode(body.encode()).decode()}
        return BrokerMessage(template["list_key"], orjson.dumps(message).decode())

    def _template(self, name: str, queue: str, priority: int) -> dict:
        key = (name, queue, priority)
        if key not in self._templates:
            self._templates[key] = self._celery_message(name, queue, priority)
        return self._templates[key]

    def _celery_message(self, name: str, queue: str, priority: int) -> dict:
        """One message published by Celery and kombu themselves, read back and kept as the template."""
        if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise ValueError(f"broker priority {priority} outside {MIN_PRIORITY}..{MAX_PRIORITY}")
        if self.app.current_worker_task is not None:
            # send_task would copy that task's ids (parent_id) into every message built from the template.
            raise RuntimeError("MessageBuilder makes its templates outside Celery tasks (API threads, the heartbeat)")
        from common.store import keys   # here: the store imports this module

        scratch = keys.MESSAGE_TEMPLATE.prefix(uuid.uuid4().hex)
        with self.app.connection_for_write() as conn, \
                self.app.connection_for_write(transport_options={"global_keyprefix": scratch}) as scratch_conn:
            # declare=[]: no binding sets are written for the scratch queue, only the message's list.
            self.app.send_task(name, args=[], kwargs={}, queue=queue, priority=priority, task_id="template",
                               connection=scratch_conn, declare=[], add_to_parent=False)
            channel = conn.default_channel      # no key prefix: reads the scratch key by its full name
            list_key = redis_list_key(queue, priority, channel.sep, channel.priority_steps)
            raw = channel.client.rpop(scratch + list_key)
            if raw is None:
                stray = list(channel.client.scan_iter(match=scratch + "*"))   # once, on a failure: may be slow
                if stray:
                    channel.client.delete(*stray)
                found = [key.decode(errors="replace")[len(scratch):] for key in stray]
                raise RuntimeError(f"kombu put a priority-{priority} message for queue {queue!r} on {found}, "
                                   f"not on {list_key!r}; update redis_list_key")
        message = json.loads(raw)
        properties = message["properties"]
        if properties.get("body_encoding") != "base64" or message.get("content-type") != "application/json":
            raise RuntimeError("kombu's Redis transport no longer writes base64-encoded JSON bodies; "
                               "update MessageBuilder")
        body = json.loads(base64.b64decode(message["body"]))
        envelope = {k: v for k, v in message.items() if k not in ("headers", "properties", "body")}
        return {"headers": message["headers"], "properties": properties, "envelope": envelope,
                "embed_json": json.dumps(body[2]), "list_key": list_key}


def redis_list_key(queue: str, priority: int, sep: str, priority_steps: list[int]) -> str:
    """The Redis list that kombu's Redis transport pushes a message of this priority onto.

    Documented by Celery ("Redis Message Priorities") and kombu's `sep` and
    `priority_steps` transport options: priorities are consolidated into
    steps (default 0, 3, 6, 9; a priority goes to the highest step not above
    it); step 0 is the list named like the queue, step n is queue + sep + n.
    MessageBuilder checks this against a real publish for every template.
    """
    step = max((s for s in priority_steps if s <= priority), default=min(priority_steps))
    return f"{queue}{sep}{step}" if step else queue


def send_callback(app: Celery, task_id: str, queue: str) -> None:
    """Enqueue the webhook delivery of a finished task (CPU queue)."""
    app.send_task(CALLBACK_TASK, args=[task_id], queue=queue, task_id=f"{task_id}-callback")


def send_create_model(app: Celery, owner: str, model_id: str, queue: str) -> None:
    """Enqueue the making of an uploaded model into its checkpoint (the callbacks queue: S3 work, no GPU)."""
    app.send_task(CREATE_MODEL_TASK, args=[owner, model_id], queue=queue)


def send_event_callback(app: Celery, task_id: str, kind: str, data: dict, queue: str) -> None:
    """Enqueue the webhook delivery of one intermediate event (started, progress, ...), best effort: never raises.

    Why best effort: these events are news, not the result; a broker blip
    loses one of them (logged), and the final callback is still owed
    through the outbox.
    """
    try:
        app.send_task(EVENT_CALLBACK_TASK, args=[task_id, kind, data], queue=queue)
    except Exception:  # noqa: BLE001 - the job goes on; the event is lost
        log.warning("could not queue the %s event webhook of task %s", kind, task_id, exc_info=True)


def hand_over_callback(app: Celery, store: Any, task_id: str, queue: str) -> bool:
    """Enqueue a task's owed webhook and take it out of the outbox; False (logged) when the enqueue fails.

    Why never raise: the task's ending is already recorded, and its outbox
    entry stays, so the reaper sends the webhook later (worker/heartbeat.py).
    """
    try:
        send_callback(app, task_id, queue)
    except Exception:  # noqa: BLE001 - broker down: the outbox keeps the webhook owed
        log.exception("could not queue the callback of task %s; the reaper will resend it", task_id)
        return False
    store.callback_handed_over(task_id)
    return True
