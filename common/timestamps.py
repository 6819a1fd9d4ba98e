"""Epoch seconds as the native API and /health write them.

Why here: the native task view, /health and the task events (common/events.py) show times in one format.
"""
from __future__ import annotations

from datetime import datetime, timezone


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> '2024-01-01T12:00:00' (UTC, no offset), the native API's format."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds")
