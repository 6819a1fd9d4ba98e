"""API keys: who is calling, compared in constant time.

Why owner ids: a task belongs to the key that created it, but raw keys are
never written to Redis; the owner is a short hash of the key.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from flask import g, request

from api.errors import error_response


@dataclass(frozen=True)
class ApiKey:
    """A configured key, its display name and the owner id its tasks carry."""

    key: str
    name: str
    owner: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "owner", "k_" + hashlib.sha256(self.key.encode()).hexdigest()[:20])


def parse_keys(raw: list) -> list[ApiKey]:
    """Accept seed 002's list of strings, or maps with `key` and optional `name`."""
    keys = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            keys.append(ApiKey(item, f"key{i + 1}"))
        elif isinstance(item, dict) and item.get("key"):
            keys.append(ApiKey(str(item["key"]), str(item.get("name") or f"key{i + 1}")))
        else:
            raise ValueError(f"api.keys[{i}]: expected a string or a map with 'key'")
    return keys


class KeyRing:
    """Looks a presented key up among the configured ones."""

    def __init__(self, keys: list[ApiKey], header: str):
        self.keys = keys
        self.header = header

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

    def authenticate(self):
        """before_request hook: set g.api_key or answer 401."""
        key = self.match(request.headers.get(self.header))
        if key is None:
            return error_response(401, f"Invalid or missing API key (header {self.header})",
                                  {"WWW-Authenticate": f'ApiKey header="{self.header}"'})
        g.api_key = key
        return None


def current_key() -> ApiKey:
    return g.api_key
