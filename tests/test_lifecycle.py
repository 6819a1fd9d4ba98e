"""Queue position, cancel (pending and running), callbacks with retry and signature."""
from __future__ import annotations

import json

from standardwebhooks.webhooks import Webhook

from tests.conftest import CALLBACK_SECRET
from tests.helpers import SLOW_JOB, Receiver, expected_signature


def running(task: dict) -> bool:
    return task["status"] == "processing" and task["progress"]["step"] > 0


def test_pending_task_shows_queue_position_then_runs(api):
    slow = api.submit(**SLOW_JOB)
    api.wait_for(slow, running)
    first, second = api.submit(), api.submit()
    a, b = api.task(first), api.task(second)
    assert a["status"] == "pending" and b["status"] == "pending"
    assert a["queue_position"] == 1 and b["queue_position"] == 2
    assert api.delete(f"/api/v1/tasks/{slow}").status_code == 200
    assert api.wait(first)["status"] == "completed"
    done = api.wait(second)
    assert done["status"] == "completed" and done["queue_position"] is None


def test_cancel_pending_task(api):
    slow = api.submit(**SLOW_JOB)
    api.wait_for(slow, running)
    victim = api.submit()
    response = api.delete(f"/api/v1/tasks/{victim}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    api.delete(f"/api/v1/tasks/{slow}")
    after = api.run()          # the worker skips the cancelled job and serves the next
    assert after["status"] == "completed"
    final = api.task(victim)
    assert final["status"] == "cancelled" and final["result_url"] is None and final["result_urls"] is None


def test_cancel_running_task_stops_it_without_outputs(api, storage):
    slow = api.submit(**SLOW_JOB)
    started = api.wait_for(slow, running)
    response = api.delete(f"/api/v1/tasks/{slow}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "cancelled"
    assert body["result_url"] is None and body["result_urls"] is None
    assert body["progress"]["step"] < body["progress"]["total"] or body["progress"]["total"] == 0
    assert started["progress"]["total"] > 0
    listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"{storage.prefix}/{slow}/")
    assert [o["Key"] for o in listed.get("Contents", [])] == []
    assert api.run()["status"] == "completed"


def test_cancel_twice_and_cancel_finished(api):
    done = api.run()
    response = api.delete(f"/api/v1/tasks/{done['task_id']}")
    assert response.status_code == 409 and "completed" in response.json()["detail"]
    slow = api.submit(**SLOW_JOB)
    api.wait_for(slow, running)
    assert api.delete(f"/api/v1/tasks/{slow}").status_code == 200
    assert api.delete(f"/api/v1/tasks/{slow}").status_code == 200


def test_callback_single_image_retried_and_signed(api):
    receiver = Receiver(fail_first=2)
    try:
        task = api.run(callback_url=receiver.url)
        deliveries = receiver.wait(3)
        payloads = [json.loads(d["body"]) for d in deliveries]
        for p in payloads:   # each retry re-signs the URL, so compare without its query
            p["image_url"] = p["image_url"].split("?")[0]
        assert all(p == payloads[0] for p in payloads)
        assert payloads[0]["task_id"] == task["task_id"] and payloads[0]["status"] == "completed"
        assert "image_url" in payloads[0] and "image_urls" not in payloads[0]
        assert payloads[0]["image_url"] == task["result_url"].split("?")[0]
        assert payloads[0]["error_message"] is None
        for d in deliveries:
            assert d["headers"]["X-SDQueue-Signature"] == expected_signature(d["body"], CALLBACK_SECRET)
            # Standard Webhooks: what its own library verifies (id + timestamp + body, so no replay later)
            headers = {k.lower(): v for k, v in d["headers"].items()}
            Webhook(CALLBACK_SECRET.encode()).verify(d["body"], headers)
        assert {d["headers"]["webhook-id"] for d in deliveries} == {f"msg_{task['task_id']}"}   # one id, retried
        assert [d["headers"]["X-SDQueue-Attempt"] for d in deliveries] == ["1", "2", "3"]
        final = api.wait_for(task["task_id"], lambda t: (t["callback_status"] or "").startswith("delivered"))
        assert final["callback_status"] == "delivered: HTTP 200 after 3 attempt(s)"
    finally:
        receiver.close()


def test_callback_several_images_and_failure(api):
    receiver = Receiver()
    try:
        api.run(callback_url=receiver.url, num_images=2)
        api.run(callback_url=receiver.url, loras=[{"name": "broken"}])
        first, second = (json.loads(d["body"]) for d in receiver.wait(2))
        by_status = {p["status"]: p for p in (first, second)}
        assert len(by_status["completed"]["image_urls"]) == 2 and "image_url" not in by_status["completed"]
        assert by_status["failed"]["error_message"]
    finally:
        receiver.close()


def test_callback_for_cancelled_pending_task(api):
    receiver = Receiver()
    try:
        slow = api.submit(**SLOW_JOB)
        api.wait_for(slow, running)
        victim = api.submit(callback_url=receiver.url)
        api.delete(f"/api/v1/tasks/{victim}")
        api.delete(f"/api/v1/tasks/{slow}")
        payload = json.loads(receiver.wait(1)[0]["body"])
        assert payload["task_id"] == victim and payload["status"] == "cancelled"
    finally:
        receiver.close()


def test_a_webhook_whose_enqueue_was_lost_is_sent_by_the_reaper(stack, rds):
    """The ending and the owed webhook are one Redis step (the outbox); a worker that dies between its
    finish and the enqueue (here: nobody enqueues at all) still gets its receiver called, by the reaper."""
    import uuid

    from common.jobspec import JobSpec
    from common.store import TaskStatus, TaskStore, keys

    receiver = Receiver()
    try:
        store = TaskStore(rds, retention_seconds=600)
        queue, task_id = "lost-" + uuid.uuid4().hex[:6], str(uuid.uuid4())
        spec = JobSpec(prompt="p", model="sdq-tiny", width=64, height=64, num_inference_steps=1, guidance_scale=1.0,
                       seed=1, callback_url=receiver.url)
        store.create(task_id, "owner-lost", spec, queue)
        picked = store.pick(queue, "gone-worker", ["sdq-tiny"], 1, None)
        assert picked.task_id == task_id
        assert store.finish(task_id, picked.attempt, "gone-worker", TaskStatus.FAILED, error="it died right after")
        assert rds.zscore(keys.CALLBACK_OUTBOX(), task_id) is not None           # owed, in the same step
        (delivery,) = receiver.wait(1, timeout=60)                               # the reaper's resend
        assert json.loads(delivery["body"])["task_id"] == task_id
        assert rds.zscore(keys.CALLBACK_OUTBOX(), task_id) is None
    finally:
        receiver.close()
