"""Task events over SSE (docs/events.md): order and payloads of completed, failed, cancelled and resumed streams,
against the real stack; the hub's stream slots and wake rules as units."""
from __future__ import annotations

import base64
import io
import json
import threading

import pytest
import requests
from PIL import Image

from api.eventstream import format_event, newest_only, valid_event_id
from api.waiter import EventHub, StreamsFull
from common.store import TaskEvent
from tests.helpers import SLOW_JOB, Receiver, read_sse, stream_events, wait_until

STEADY = {"width": 128, "height": 128, "num_inference_steps": 24}   # long enough for several progress writes
FINALS = ("completed", "failed", "cancelled")


def id_order(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def occupy_worker(api) -> str:
    """A slow job the worker is busy with, so the next submission waits in the queue."""
    blocker = api.submit(**SLOW_JOB)
    api.wait_for(blocker, lambda t: t["status"] == "processing")
    return blocker


def test_stream_follows_a_job_from_the_queue_to_completion(api):
    blocker = occupy_worker(api)
    task = api.submit(**STEADY)
    with requests.get(f"{api.base}/api/v1/tasks/{task}/events", headers=api.headers(), stream=True,
                      timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["Cache-Control"] == "no-cache"
        events = read_sse(response)
        first = next(events)
        assert first.kind == "queued" and first.id
        assert first.data == {"task_id": task, "status": "pending", "queue_position": 1, "attempt": 0}
        api.delete(f"/api/v1/tasks/{blocker}")
        rest = list(events)
    kinds = [e.kind for e in rest]
    assert kinds[-1] == "completed" and kinds.count("completed") == 1
    started = rest[kinds.index("started")]
    assert started.data["model"] and started.data["worker"] and started.data["attempt"] == 0
    progress = [e for e in rest if e.kind == "progress"]
    assert progress, kinds
    assert kinds.index("started") < kinds.index("progress") < kinds.index("completed")
    steps = [e.data["step"] for e in progress]
    total = progress[0].data["total"]                      # the scheduler's timesteps (>= the steps asked)
    assert steps == sorted(steps) and total >= 24 and all(0 < e.data["step"] <= e.data["total"] == total
                                                          for e in progress)
    assert all(e.data["fraction"] == round(e.data["step"] / total, 4) for e in progress)
    assert all(isinstance(e.data["eta_seconds"], (float, type(None))) for e in progress)   # its value: test_taskstore
    assert "preview" not in kinds                           # not asked for
    assert rest[-1].data == api.task(task)                  # the final event is GET /api/v1/tasks/{id}
    ids = [e.id for e in [first, *rest]]
    assert all(ids) and ids == sorted(ids, key=id_order) and len(set(ids)) == len(ids)


def test_stream_of_a_finished_task_sends_its_end_at_once_and_204_after_it(api):
    task = api.submit()
    api.wait(task)
    events = stream_events(api, task)
    assert [e.kind for e in events] == ["completed"]
    assert events[0].data == api.task(task)
    again = requests.get(f"{api.base}/api/v1/tasks/{task}/events",
                         headers={**api.headers(), "Last-Event-ID": events[0].id}, timeout=30)
    assert again.status_code == 204                         # EventSource stops reconnecting


def test_stream_of_a_failed_job_ends_with_its_error(api):
    task = api.submit(loras=[{"name": "broken"}])
    events = stream_events(api, task)
    assert events[-1].kind == "failed"
    assert events[-1].data["status"] == "failed" and events[-1].data["error_message"]
    assert events[-1].data == api.task(task)


def test_cancel_ends_the_stream_with_a_cancelled_event(api):
    task = api.submit(**SLOW_JOB)
    got: list = []

    def cancel_once_running(event) -> bool:
        got.append(event)
        if event.kind == "progress" and len([e for e in got if e.kind == "progress"]) == 1:
            api.delete(f"/api/v1/tasks/{task}")
        return event.kind in FINALS

    events = stream_events(api, task, until=cancel_once_running)
    assert events[-1].kind == "cancelled"
    assert events[-1].data["status"] == "cancelled" and events[-1].data == api.task(task)


def test_a_resumed_stream_continues_after_its_last_event(api):
    task = api.submit(**{**STEADY, "num_inference_steps": 60})
    head = stream_events(api, task, until=lambda e: e.kind == "progress")
    assert head[-1].kind == "progress"
    rest = stream_events(api, task, last_id=head[-1].id)
    assert rest[-1].kind == "completed"
    assert all(id_order(e.id) > id_order(head[-1].id) for e in rest if e.id)
    steps = [e.data["step"] for e in rest if e.kind == "progress"]
    assert all(step >= head[-1].data["step"] for step in steps)
    assert "queued" not in [e.kind for e in rest]
    by_query = requests.get(f"{api.base}/api/v1/tasks/{task}/events?last_event_id={rest[-1].id}",
                            headers=api.headers(), timeout=30)
    assert by_query.status_code == 204


def test_streams_are_owned_and_checked(api, api_b):
    task = api.submit()
    other = requests.get(f"{api.base}/api/v1/tasks/{task}/events", headers=api_b.headers(), timeout=30)
    missing = requests.get(f"{api.base}/api/v1/tasks/no-such-task/events", headers=api_b.headers(), timeout=30)
    assert other.status_code == missing.status_code == 404
    assert other.json() == missing.json()
    bad = requests.get(f"{api.base}/api/v1/tasks/{task}/events",
                       headers={**api.headers(), "Last-Event-ID": "yesterday"}, timeout=30)
    assert bad.status_code == 422 and "Last-Event-ID" in bad.text
    bad_query = requests.get(f"{api.base}/api/v1/tasks/{task}/events?last_event_id=x", headers=api.headers(),
                             timeout=30)
    assert bad_query.status_code == 422 and "last_event_id" in bad_query.text
    nokey = requests.get(f"{api.base}/api/v1/tasks/{task}/events", timeout=30)
    assert nokey.status_code == 401
    api.wait(task)


# --- units ------------------------------------------------------------------------------------------------------

def quiet_hub(max_streams: int = 2) -> EventHub:
    """A hub with no listener thread (no Redis here): the tests wake it by hand."""
    hub = EventHub(store=None, max_waiters=4, max_streams=max_streams)
    hub._ensure_listener = lambda: None
    hub._subscribed.set()
    return hub


def test_stream_slots_are_bounded_and_freed():
    hub = quiet_hub()
    first, second = hub.listen("a"), hub.listen("b")
    assert hub.streams_open == 2
    with pytest.raises(StreamsFull):
        hub.listen("c")
    first.close()
    first.close()                                           # idempotent: frees one slot once
    third = hub.listen("c")
    assert hub.streams_open == 2
    second.close(), third.close()
    assert hub.streams_open == 0


def test_step_events_wake_streams_but_not_waiters():
    hub = quiet_hub()
    stream = hub.listen("t")
    waiter = threading.Event()
    hub._register("t", waiter)
    hub._wake("t", "progress")
    assert stream.news.is_set() and not waiter.is_set()
    hub._wake("t", "completed")
    assert waiter.is_set()
    stream.close()


def test_only_the_newest_progress_and_preview_are_sent():
    events = [TaskEvent("1-0", "started", {}), TaskEvent("2-0", "progress", {"step": "1"}),
              TaskEvent("3-0", "preview", {}), TaskEvent("4-0", "progress", {"step": "2"}),
              TaskEvent("5-0", "preview", {}), TaskEvent("6-0", "completed", {})]
    assert [e.id for e in newest_only(events)] == ["1-0", "4-0", "5-0", "6-0"]


def test_event_format_and_ids():
    assert format_event("progress", {"step": 1}, "5-1") == b'id: 5-1\nevent: progress\ndata: {"step":1}\n\n'
    assert format_event("queued", {"queue_position": 2}) == b'event: queued\ndata: {"queue_position":2}\n\n'
    assert valid_event_id("1733555000123-0") and not valid_event_id("1-0\nevent: x") and not valid_event_id("")


# --- previews ---------------------------------------------------------------------------------------------------

def test_previews_come_every_n_steps_when_asked(api):
    task = api.submit(**STEADY, preview_every=4)
    events = stream_events(api, task)
    previews = [e for e in events if e.kind == "preview"]
    assert previews and events[-1].kind == "completed"
    for event in previews:
        data = event.data
        assert data["step"] % 4 == 0 and 0 < data["step"] <= data["total"]
        assert data["image"].startswith("data:image/jpeg;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(data["image"].partition(",")[2])))
        assert image.format == "JPEG" and image.size == (data["width"], data["height"]) == (128, 128)
    assert not [e for e in stream_events(api, task) if e.kind == "preview"]   # gone once the task ended


def test_preview_every_is_checked(api):
    response = api.post("/api/v1/generate", {"prompt": "x", **STEADY, "preview_every": -1})
    assert response.status_code == 422 and "preview_every" in response.text


def test_a1111_progress_shows_the_live_preview_as_current_image(api):
    body = {"prompt": "a slow harbour", "width": 256, "height": 256, "steps": 150,
            "override_settings": {"show_progress_every_n_steps": 2}}
    answer: dict = {}
    caller = threading.Thread(target=lambda: answer.update(
        response=requests.post(f"{api.base}/sdapi/v1/txt2img", json=body, headers=api.headers(), timeout=300)))
    caller.start()
    try:
        progress = wait_until(lambda: (lambda p: p if p["current_image"] else None)(
            api.get("/sdapi/v1/progress").json()), timeout=120, what="a current_image")
        image = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        assert image.format == "JPEG" and max(image.size) <= 256
        skipped = api.get("/sdapi/v1/progress?skip_current_image=true").json()
        assert skipped["current_image"] is None
    finally:
        api.post("/sdapi/v1/interrupt")
        caller.join(timeout=120)


# --- webhook events ---------------------------------------------------------------------------------------------

def test_callback_events_send_the_chosen_events_with_the_sse_payloads(api):
    receiver = Receiver()
    try:
        task = api.submit(**STEADY, callback_url=receiver.url,
                          callback_events=["queued", "started", "progress", "completed"])
        final = api.wait(task)
        assert final["status"] == "completed"
        wait_until(lambda: final_delivered(receiver), timeout=60, what="the final callback")
        bodies = [json.loads(r["body"]) for r in receiver.received]
        kinds = {b.get("type", "final") for b in bodies}
        assert {"queued", "started", "progress", "final"} <= kinds, kinds
        started = next(b for b in bodies if b.get("type") == "started")
        assert started["task_id"] == task and started["data"]["model"] and started["data"]["status"] == "processing"
        progress = [b["data"] for b in bodies if b.get("type") == "progress"]
        assert all(p["task_id"] == task and 0 < p["step"] <= p["total"] for p in progress)
        legacy = next(b for b in bodies if "type" not in b)
        assert legacy["status"] == "completed" and legacy["image_url"]      # the final body is unchanged
        ids = [r["headers"].get("webhook-id") for r in receiver.received]
        assert len(set(ids)) == len(ids)                                    # each event its own message id
    finally:
        receiver.close()


def test_callback_events_without_a_final_kind_send_no_final_callback(api):
    receiver = Receiver()
    try:
        task = api.submit(callback_url=receiver.url, callback_events=["started"])
        api.wait(task)
        status = wait_until(lambda: (api.task(task)["callback_status"] or "").startswith("not sent") and
                            api.task(task)["callback_status"], timeout=60, what="callback_status")
        assert status == "not sent: completed is not in callback_events"
        receiver.wait(1)
        assert [json.loads(r["body"])["type"] for r in receiver.received] == ["started"]
    finally:
        receiver.close()


def test_callback_events_are_checked(api):
    alone = api.post("/api/v1/generate", {"prompt": "x", "callback_events": ["started"]})
    assert alone.status_code == 422 and "callback_events" in alone.text
    unknown = api.post("/api/v1/generate", {"prompt": "x", "callback_url": "https://example.com/hook",
                                            "callback_events": ["finished"]})
    assert unknown.status_code == 422 and "callback_events" in unknown.text


def final_delivered(receiver: Receiver) -> bool:
    return any("type" not in json.loads(r["body"]) for r in receiver.received)
