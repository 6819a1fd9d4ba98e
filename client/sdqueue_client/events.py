"""Server-sent events: the Event type and a small parser of the WHATWG format.

Why our own: the format is four fields and a blank line, and owning the
parser lets the sync and async clients feed it the same lines and keep the
state that resuming needs (the last event id, the server's `retry:`).
Spec: https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional

FINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class Event:
    """One event: its `type` (`event:`, "message" when absent), the `id` it carried (None if none) and its
    `data` (the parsed JSON, or the text when it is not JSON)."""

    type: str
    id: Optional[str]
    data: Any

    @property
    def final(self) -> bool:
        """completed, failed or cancelled: the task ended and the server closes the stream."""
        return self.type in FINAL_EVENTS


class EventParser:
    """Feed it lines (without their line ending); it returns the events each blank line completes."""

    def __init__(self, last_event_id: Optional[str] = None):
        self.last_event_id = last_event_id    # what Last-Event-ID says on a reconnect
        self.retry_ms: Optional[int] = None   # the server's reconnection delay, once it sent one
        self._first = True
        self._reset()

    def _reset(self) -> None:
        self._type = ""
        self._data: List[str] = []
        self._id: Optional[str] = None

    def feed(self, line: str) -> List[Event]:
        """Process one line; a list of zero or one events."""
        if self._first:
            self._first = False
            line = line.lstrip("\ufeff")
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return []                          # a comment: keep-alive
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        self._field(name, value)
        return []

    def feed_all(self, lines: Iterable[str]) -> List[Event]:
        return [event for line in lines for event in self.feed(line)]

    def _field(self, name: str, value: str) -> None:
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
            self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        # any other field is ignored, as the spec says

    def _dispatch(self) -> List[Event]:
        """A blank line ends an event; one without data lines is no event (but its id still counts)."""
        if not self._data:
            self._reset()
            return []
        event = Event(self._type or "message", self._id, parse_data("\n".join(self._data)))
        self._reset()
        return [event]


def parse_data(text: str) -> Any:
    """The service sends one line of JSON; anything else is kept as text."""
    try:
        return json.loads(text)
    except ValueError:
        return text
