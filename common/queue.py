"""The Celery app, configured from one dict, shared by senders and workers.

Why here: the API only *sends* tasks (by name, so it never imports worker
code or torch); workers register the task bodies on the same configuration.
"""
from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass

import orjson
from celery import Celery
from kombu.serialization import dumps as serialize

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
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "task_routes": {GENERATE_TASK: {"queue": settings.tasks.queue},
                        CALLBACK_TASK: {"queue": settings.callbacks.queue}},
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
    reverse) and costs one round trip. Celery's own protocol code
    (`amqp.as_task_v2`) and kombu's channel build a template once per task
    name and queue; each submission only fills in its ids, arguments and
    delivery tag (tests compare the result with what `send_task` writes).
    """

    def __init__(self, app: Celery):
        self.app = app
        self._channel = None
        self._templates: dict[tuple[str, str, int], dict] = {}

    @property
    def channel(self):
        """kombu's virtual channel, opened on first use (the API may start before Redis)."""
        if self._channel is None:
            self._channel = self.app.connection_for_write().default_channel
        return self._channel

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
        """One message made by Celery and kombu themselves, kept as the template."""
        headers, properties, body, _ = self.app.amqp.as_task_v2(
            "template", name, args=[], kwargs={}, reply_to=self.app.thread_oid, ignore_result=None,
            argsrepr="[]", kwargsrepr="{}")
        content_type, content_encoding, data = serialize(body, serializer="json")
        properties = {**properties, "delivery_mode": 2}
        message = self.channel.prepare_message(data, priority, content_type, content_encoding, headers, properties)
        # Celery publishes direct-routed tasks on the anonymous exchange, keyed by queue name.
        self.channel._inplace_augment_message(message, "", queue)
        envelope = {k: v for k, v in message.items() if k not in ("headers", "properties", "body")}
        if message["properties"]["body_encoding"] != "base64":
            raise RuntimeError("kombu's Redis transport no longer base64-encodes bodies; update MessageBuilder")
        return {"headers": message["headers"], "properties": message["properties"], "envelope": envelope,
                "embed_json": json.dumps(body[2]), "list_key": self.channel._q_for_pri(queue, priority)}


def send_callback(app: Celery, task_id: str, queue: str) -> None:
    """Enqueue the webhook delivery of a finished task (CPU queue)."""
    app.send_task(CALLBACK_TASK, args=[task_id], queue=queue, task_id=f"{task_id}-callback")
