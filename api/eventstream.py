"""One task's events as server-sent events (GET /api/v1/tasks/{id}/events; docs/events.md).

Why this shape: the worker's Lua transitions append every event to the
task's event log (a Redis stream, common/store/keys.py EVENT_LOG) and
announce it on the pub/sub channel the API's EventHub already listens to.
A stream here only sleeps on the hub until something happens, then reads
the log after the last id it sent; so ids are stable, a client resumes
with Last-Event-ID, and no stream holds a Redis connection of its own.
It still holds one gunicorn thread while open, so streams are bounded in
number (api.max_streams, 503 beyond) and in time (api.stream_seconds).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import orjson

from api.waiter import EventHub, Listener
from common.events import STEP_KINDS, preview_data, progress_data, queued_data, started_data
from common.store import Task, TaskEvent, TaskStatus, TaskStore

KEEPALIVE_SECONDS = 15.0
POSITION_SECONDS = 2.0          # how often a waiting task's place in the queue is looked at again
RETRY_MS = 2000
EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
SUPERSEDED = STEP_KINDS                 # of these, only the newest waiting to be sent is sent


def valid_event_id(value: str) -> bool:
    """Whether `value` can be an id this service sent (a Redis stream id)."""
    return bool(EVENT_ID.match(value))


def format_event(kind: str, data: dict, event_id: str | None = None) -> bytes:
    """One SSE event: optional id, event name, and the data as one JSON line."""
    head = f"id: {event_id}\n" if event_id else ""
    return (head + f"event: {kind}\n").encode() + b"data: " + orjson.dumps(data) + b"\n\n"


def newest_only(events: list[TaskEvent]) -> list[TaskEvent]:
    """Drop each progress or preview event that a newer one of its kind follows (a late reader gets the present)."""
    last = {event.kind: i for i, event in enumerate(events) if event.kind in SUPERSEDED}
    return [e for i, e in enumerate(events) if e.kind not in SUPERSEDED or last[e.kind] == i]


@dataclass
class TaskEventStream:
    """The events of one task for one client, as SSE bytes.

    `render_final(task)` is the body of GET /api/v1/tasks/{id} (the final
    event carries exactly it); `deadline` ends a long stream without a final
    event, for the client to resume.
    """

    store: TaskStore
    listener: Listener
    task_id: str
    render_final: Callable[[Task], dict]
    last_id: str | None
    max_seconds: float
    position: int | None = None

    def __iter__(self) -> Iterator[bytes]:
        news = self.listener.news
        yield f"retry: {RETRY_MS}\n\n".encode()
        deadline = time.monotonic() + self.max_seconds
        quiet_since = time.monotonic()
        while True:
            for chunk, final in self.pending_chunks():
                yield chunk
                quiet_since = time.monotonic()
                if final:
                    return
            task = self.store.get(self.task_id)
            if task.status.terminal:          # it ended since the log was read: its final event is there now
                yield from self.final_chunk(task)
                return
            moved = self.queue_place(task)
            if moved is not None:
                self.position = moved
                yield format_event("queued", {"task_id": self.task_id, "status": "pending",
                                              "queue_position": moved, "attempt": task.attempt})
                quiet_since = time.monotonic()
            now = time.monotonic()
            if now >= deadline:
                return
            if now - quiet_since >= KEEPALIVE_SECONDS:
                yield b": keep-alive\n\n"
                quiet_since = now
            pause = POSITION_SECONDS if task.status is TaskStatus.PENDING else KEEPALIVE_SECONDS
            news.wait(min(pause, KEEPALIVE_SECONDS - (now - quiet_since), deadline - now))
            news.clear()

    def pending_chunks(self) -> Iterator[tuple[bytes, bool]]:
        """The log's events after the last one sent, rendered, newest progress/preview only; (chunk, final)."""
        events = newest_only(self.store.events_after(self.task_id, self.last_id))
        for event in events:
            self.last_id = event.id
            data = self.event_data(event)
            if data is not None:
                yield format_event(event.kind, data, event.id), event.final
            if event.final:
                return

    def final_chunk(self, task: Task) -> Iterator[bytes]:
        """The end of a task that ended: its final event from the log, or (a task older than event logs) one
        made from its hash."""
        sent_final = False
        for chunk, final in self.pending_chunks():
            yield chunk
            sent_final = sent_final or final
        if not sent_final:
            yield format_event(task.status.value, self.render_final(task))

    def event_data(self, event: TaskEvent) -> dict | None:
        """The JSON an event carries (common/events.py), None for a preview that is gone already."""
        fields = event.fields
        if event.final:
            return self.render_final(self.store.get(self.task_id))
        if event.kind == "queued":
            self.position = self.store.queue_position(self.store.get(self.task_id))
            return queued_data(self.task_id, self.position, int(fields.get("attempt") or 0), bool(fields.get("requeued")))
        if event.kind == "started":
            return started_data(self.task_id, fields.get("worker"), fields.get("model"),
                                int(fields.get("attempt") or 0), fields.get("at"))
        if event.kind == "progress":
            return progress_data(self.task_id, int(fields.get("step") or 0), int(fields.get("total") or 0),
                                 fields.get("eta"), fields.get("loss"))
        if event.kind == "preview":
            preview = self.store.preview(self.task_id)
            return None if preview is None else preview_data(self.task_id, preview)
        return None

    def queue_place(self, task: Task) -> int | None:
        """The task's new place in its queue when it waits and the place changed since last sent, else None."""
        if task.status is not TaskStatus.PENDING:
            return None
        place = self.store.queue_position(task)
        return place if place is not None and place != self.position else None


def open_stream(store: TaskStore, hub: EventHub, task: Task, render_final: Callable[[Task], dict],
                last_id: str | None, max_seconds: float) -> Iterator[bytes] | None:
    """The stream for `task`, or None when the client already has its final event (HTTP 204 stops EventSource).

    A finished task's log holds only its final event (the Lua conclude step
    trims it), so a new stream of a finished task sends its end at once.
    """
    if last_id is not None and task.status.terminal:
        final = store.last_event(task.id)
        if final is not None and final.final and final.id == last_id:
            return None
    listener = hub.listen(task.id)        # StreamsFull here, before the answer starts: a 503
    return SlotStream(iter(TaskEventStream(store, listener, task.id, render_final, last_id, max_seconds)), listener)


class SlotStream:
    """The WSGI body of a stream: its chunks, and close() (which the server always calls) frees the slot.

    Why not a generator with `finally`: a generator the server never
    started (the client left at once) never enters its `try`.
    """

    def __init__(self, chunks: Iterator[bytes], listener: Listener):
        self.chunks = chunks
        self.listener = listener

    def __iter__(self) -> "SlotStream":
        return self

    def __next__(self) -> bytes:
        return next(self.chunks)

    def close(self) -> None:
        try:
            getattr(self.chunks, "close", lambda: None)()
        finally:
            self.listener.close()
