"""The API's atomic enqueue writes exactly the message Celery's send_task writes."""
from __future__ import annotations

import json

import pytest

from common.queue import GENERATE_TASK, MessageBuilder, create_celery
from common.store import keys


def comparable(raw: str) -> dict:
    """Drop the fields that differ on every publish (delivery tag, origin host/pid, reply queue)."""
    message = json.loads(raw)
    message["properties"]["delivery_tag"] = message["headers"]["origin"] = message["properties"]["reply_to"] = "-"
    return message


def test_built_message_equals_celery_send_task(settings, rds):
    app = create_celery(settings)
    builder = MessageBuilder(app)
    queue = "message-compare"
    for task_id, attempt in (("first-task", 0), ("second-task", 3)):   # the template is reused
        celery_id = task_id if attempt == 0 else f"{task_id}-r{attempt}"
        app.send_task(GENERATE_TASK, args=[task_id, attempt], queue=queue, task_id=celery_id)
        real = rds.lpop(queue)
        built = builder.generate(task_id, attempt, queue)
        assert built.list_key == queue
        assert comparable(built.payload) == comparable(real)


@pytest.mark.parametrize("priority", [1, 3, 5, 9])
def test_built_message_with_a_priority_goes_where_send_task_puts_it(settings, rds, priority):
    """Broker priorities use kombu's per-step lists; the builder finds the same list for two queues."""
    app = create_celery(settings)
    builder = MessageBuilder(app)
    for queue in ("message-priority.a", "message-priority.b"):
        app.send_task(GENERATE_TASK, args=["prio-task", 1], queue=queue, task_id="prio-task-r1", priority=priority)
        [real_key] = rds.scan_iter(match=f"{queue}*", _type="list")
        real = rds.lpop(real_key)
        built = builder.generate("prio-task", 1, queue, priority)
        assert built.list_key == real_key
        assert comparable(built.payload) == comparable(real)
    assert not list(rds.scan_iter(match=keys.MESSAGE_TEMPLATE.prefix() + "*"))     # the templates' scratch lists are gone
