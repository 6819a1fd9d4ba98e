"""Webhook payloads (the native API's callback shape), HMAC signing, delivery.

Why a separate queue: a slow or failing receiver is retried with backoff by
a CPU worker and never holds a GPU worker.
"""
from __future__ import annotations

import hashlib
import hmac
import json

import requests

SIGNATURE_HEADER = "X-SDQueue-Signature"
USER_AGENT = "sdqueue-webhook/1"
_RETRY_STATUS = {408, 425, 429}


class RetryableDelivery(Exception):
    """The receiver was unreachable or answered 5xx/408/429: try again later."""


def build_payload(task_id: str, status: str, urls: list[str], error_message: str | None) -> dict:
    """`image_url` for one image, `image_urls` for several (exactly one key, as the native API's receivers expect)."""
    payload: dict = {"task_id": task_id, "status": status}
    if len(urls) == 1:
        payload["image_url"] = urls[0]
    elif urls:
        payload["image_urls"] = urls
    payload["error_message"] = error_message
    return payload


def sign(body: bytes, secret: str) -> str:
    """`sha256=<hex>` over the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver(url: str, payload: dict, secret: str, timeout: float, attempt: int) -> int:
    """POST the payload; return the status code, or raise RetryableDelivery."""
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
               "X-SDQueue-Task-Id": payload["task_id"], "X-SDQueue-Attempt": str(attempt)}
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    try:
        response = requests.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        raise RetryableDelivery(f"{type(exc).__name__}: {exc}") from exc
    if response.status_code >= 500 or response.status_code in _RETRY_STATUS:
        raise RetryableDelivery(f"receiver answered {response.status_code}")
    return response.status_code
