"""API keys: who is calling, compared in constant time.

Why owner ids: a task belongs to the key that created it, but raw keys are
never written to Redis; the owner is a short hash of the key.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Callable

from flask import g, request

from common.store.authfailures import AuthFailures
from common.store.tasks import PRIORITIES

DIALECTS = ("native", "a1111", "eks", "aws", "draw")
QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


@dataclass(frozen=True)
class ApiKey:
    """A configured key, its display name, the owner id its tasks carry, and its policy.

    Policy (all optional in config.yaml): `submit_limit` / `read_limit`
    (Flask-Limiter strings, "" for none; default api.submit_limit / api.read_limit),
    `dialects`, `models`, worker `pools` (AWS-extension endpoints) and `priorities`
    it may use (default: all), `max_pending` jobs it may have waiting
    (default tasks.max_pending_per_key; 0: no limit), the `queue` (worker
    pool) its jobs go to when the request names none (default tasks.queue):
    a tenant with GPUs of its own, and `lenient` (default api.lenient: accept
    unsupported generation fields with a warning).
    """

    key: str
    name: str
    submit_limit: str | None = None
    read_limit: str | None = None
    dialects: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    pools: tuple[str, ...] | None = None
    priorities: tuple[str, ...] | None = None
    max_pending: int | None = None
    queue: str | None = None
    lenient: bool | None = None
    owner: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "owner", "k_" + hashlib.sha256(self.key.encode()).hexdigest()[:20])

    def may_use_dialect(self, dialect: str) -> bool:
        return self.dialects is None or dialect in self.dialects

    def may_use_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def may_use_pool(self, pool: str) -> bool:
        return self.pools is None or pool in self.pools

    def may_use_priority(self, priority: str) -> bool:
        return self.priorities is None or priority in self.priorities

    def priority_for(self, requested: str) -> str:
        """`requested` if allowed, else the key's own default: normal when allowed, else its first listed.

        For dialects whose clients cannot choose a priority (they ask for normal).
        """
        if self.may_use_priority(requested):
            return requested
        return "normal" if self.may_use_priority("normal") else self.priorities[0]

    def is_lenient(self, default: bool) -> bool:
        """Whether unsupported generation fields are accepted with a warning (api.lenient unless the key says)."""
        return default if self.lenient is None else self.lenient


def _names(item: dict, field_name: str, i: int) -> tuple[str, ...] | None:
    value = item.get(field_name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"api.keys[{i}].{field_name}: expected a list of names")
    return tuple(value)


def _queue(item: dict, i: int, reserved: tuple[str, ...]) -> str | None:
    """A key's own queue: a plain name (it becomes a Redis key and a Celery queue), not a reserved one."""
    value = item.get("queue")
    if value is None:
        return None
    if not isinstance(value, str) or not QUEUE_NAME.match(value):
        raise ValueError(f"api.keys[{i}].queue: expected a queue name (letters, digits, '-', '_', '.')")
    if value in reserved:
        raise ValueError(f"api.keys[{i}].queue: {value!r} is not a worker pool (the webhook queue)")
    return value


def parse_keys(raw: list, reserved_queues: tuple[str, ...] = ()) -> list[ApiKey]:
    """Accept the native API's list of strings, or maps with `key`, optional `name` and policy fields.

    `reserved_queues`: queue names no key may send jobs to (the webhook queue).
    """
    keys = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            keys.append(ApiKey(item, f"key{i + 1}"))
        elif isinstance(item, dict) and item.get("key"):
            dialects = _names(item, "dialects", i)
            unknown = set(dialects or ()) - set(DIALECTS)
            if unknown:
                raise ValueError(f"api.keys[{i}].dialects: unknown {sorted(unknown)}; known: {list(DIALECTS)}")
            limits = {f: None if item.get(f) is None else str(item[f]) for f in ("submit_limit", "read_limit")}
            priorities = _names(item, "priorities", i)
            unknown = set(priorities or ()) - set(PRIORITIES)
            if unknown:
                raise ValueError(f"api.keys[{i}].priorities: unknown {sorted(unknown)}; known: {list(PRIORITIES)}")
            max_pending = item.get("max_pending")
            if max_pending is not None and (not isinstance(max_pending, int) or max_pending < 0):
                raise ValueError(f"api.keys[{i}].max_pending: expected a whole number >= 0")
            lenient = item.get("lenient")
            if lenient is not None and not isinstance(lenient, bool):
                raise ValueError(f"api.keys[{i}].lenient: expected true or false")
            keys.append(ApiKey(str(item["key"]), str(item.get("name") or f"key{i + 1}"), dialects=dialects,
                               models=_names(item, "models", i), pools=_names(item, "pools", i),
                               priorities=priorities, max_pending=max_pending, lenient=lenient,
                               queue=_queue(item, i, reserved_queues), **limits))
        else:
            raise ValueError(f"api.keys[{i}]: expected a string or a map with 'key'")
    return keys


def basic_auth_password() -> str | None:
    """The password of an HTTP Basic header (A1111's --api-auth: any user name, the key as password)."""
    header = request.headers.get("Authorization", "")
    if not header[:6].lower() == "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None


def bearer_token() -> str | None:
    """The token of an `Authorization: Bearer <key>` header (/v1/draw)."""
    header = request.headers.get("Authorization", "")
    return header[7:].strip() or None if header[:7].lower() == "bearer " else None


class KeyRing:
    """Looks a presented key up among the configured ones."""

    def __init__(self, keys: list[ApiKey], header: str, default_max_pending: int = 0,
                 failures: AuthFailures | None = None, failures_per_minute: int = 0):
        self.keys = keys
        self.header = header
        self._by_owner = {k.owner: k for k in keys}
        self.default_max_pending = default_max_pending
        self.failures = failures
        self.failures_per_minute = failures_per_minute

    def max_pending(self, owner: str) -> int:
        """How many waiting jobs this key's owner may have (0: no limit)."""
        key = self._by_owner.get(owner)
        return self.default_max_pending if key is None or key.max_pending is None else key.max_pending

    def queue_for(self, owner: str) -> str | None:
        """The queue this owner's jobs go to when the request names no pool (api.keys[].queue), or None."""
        key = self._by_owner.get(owner)
        return None if key is None else key.queue

    def priority_for(self, owner: str, requested: str) -> str:
        """The priority a job of this owner gets (see ApiKey.priority_for)."""
        key = self._by_owner.get(owner)
        return requested if key is None else key.priority_for(requested)

    def match(self, presented: str | None) -> ApiKey | None:
        """Compare against every key (constant time per key, no early exit)."""
        if not presented:
            return None
        found = None
        candidate = presented.encode()
        for key in self.keys:
            if hmac.compare_digest(candidate, key.key.encode()):
                found = key
        return found

    def check(self, dialect: str, extra: Callable[[], str | None] | None,
              unauthorized: Callable[[], object], forbidden: Callable[[], object]) -> object | None:
        """A dialect's before_request check: the key header or the dialect's own scheme.

        `extra` reads the dialect's scheme (Basic, Bearer); `unauthorized` and
        `forbidden` render 401/403 in the dialect's error shape; a key not
        allowed this dialect (api.keys[].dialects) gets 403. None: go on,
        with g.api_key set.
        """
        key = self.match(request.headers.get(self.header)) or (self.match(extra()) if extra else None)
        if key is None:
            return self.refuse(unauthorized)
        if not key.may_use_dialect(dialect):
            return forbidden()
        g.api_key = key
        return None


    def refuse(self, unauthorized: Callable[[], object]) -> object:
        """401, counted per client address; past api.auth_failures_per_minute, a 429 for the rest of the
        minute to every further wrong key from that address (guessing keys gets slow; valid keys pass)."""
        if self.failures is None or not self.failures_per_minute:
            return unauthorized()
        from api.errors import dialect_error

        if self.failures.record(request.remote_addr or "unknown") > self.failures_per_minute:
            return dialect_error(429, "too many requests with a wrong or missing API key from this address; "
                                      "retry in a minute", {"Retry-After": "60"})
        return unauthorized()


def current_key() -> ApiKey:
    return g.api_key
