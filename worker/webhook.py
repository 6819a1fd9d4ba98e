"""Webhook payloads (the native API's callback shape), signing, delivery.

Why a separate queue: a slow or failing receiver is retried with backoff by
a CPU worker and never holds a GPU worker. Why Standard Webhooks: receivers
verify with the `standardwebhooks` library of their language (id, timestamp
and body signed together, so a captured request cannot be replayed later);
the older `X-SDQueue-Signature` (body only) is still sent for receivers
written against it. Why the pinned client (common/egress.py): the callback
URL is the client's, so the connection itself refuses a non-public address
(checked at the connect, not before it); redirects are not followed.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import datetime, timezone

import requests
from standardwebhooks.webhooks import Webhook

from common.egress import PinnedSession
from common.netguard import Guard

SIGNATURE_HEADER = "X-SDQueue-Signature"
USER_AGENT = "sdqueue-webhook/1"
_RETRY_STATUS = {408, 425, 429}


class RetryableDelivery(Exception):
    """The receiver was unreachable or answered 5xx/408/429: try again later."""


def build_payload(task_id: str, status: str, urls: list[str], error_message: str | None,
                  result: dict | None = None) -> dict:
    """`image_url` for one image, `image_urls` for several (exactly one key, as the native API's receivers expect);
    a job that makes something else says what (a training job's `lora`: Task.result)."""
    payload: dict = {"task_id": task_id, "status": status}
    if len(urls) == 1:
        payload["image_url"] = urls[0]
    elif urls:
        payload["image_urls"] = urls
    payload["error_message"] = error_message
    return {**payload, **(result or {})}


def build_event_payload(kind: str, task_id: str, data: dict) -> dict:
    """An intermediate event's body (callback_events): its type and the SSE event's data (docs/events.md)."""
    return {"type": kind, "task_id": task_id, "data": data}


def sign(body: bytes, secret: str) -> str:
    """`sha256=<hex>` over the exact body bytes (the legacy X-SDQueue-Signature)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def secret_key(secret: str) -> bytes:
    """The HMAC key of callbacks.secret: a Standard Webhooks `whsec_<base64>` secret decoded, any other
    string as its UTF-8 bytes (what a receiver passes to `Webhook(...)`)."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_") + "==")
    return secret.encode()


def standard_headers(message_id: str, body: bytes, secret: str, now: datetime | None = None) -> dict[str, str]:
    """Standard Webhooks' webhook-id / webhook-timestamp / webhook-signature for one delivery attempt.

    The id is the same on every retry of one task's callback (receivers
    deduplicate on it); the timestamp is the attempt's.
    """
    moment = now or datetime.now(tz=timezone.utc)
    signature = Webhook(secret_key(secret)).sign(message_id, moment, body.decode())
    return {"webhook-id": message_id, "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": signature}


def deliver(url: str, payload: dict, secret: str, timeout: float, attempt: int, guard: Guard,
            message_id: str | None = None) -> int:
    """POST the payload through the pinned client; return the status code, or raise RetryableDelivery.

    Raises netguard.Refused (not retried) when the URL or the address it
    resolves to now is refused by `guard`. The answer's body is never read.
    `message_id`: the Standard Webhooks id (default: one per task, its final callback).
    """
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
               "X-SDQueue-Task-Id": payload["task_id"], "X-SDQueue-Attempt": str(attempt)}
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)
        headers.update(standard_headers(message_id or f"msg_{payload['task_id']}", body, secret))
    with PinnedSession(guard) as session:
        try:
            response = session.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False,
                                    stream=True)
        except requests.RequestException as exc:
            raise RetryableDelivery(f"{type(exc).__name__}: {exc}") from exc
        response.close()
    if response.status_code >= 500 or response.status_code in _RETRY_STATUS:
        raise RetryableDelivery(f"receiver answered {response.status_code}")
    return response.status_code
