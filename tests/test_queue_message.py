"""The API's atomic enqueue writes exactly the message Celery's send_task writes."""
from __future__ import annotations

import json

from common.queue import GENERATE_TASK, MessageBuilder, create_celery


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
