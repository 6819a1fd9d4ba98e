"""Per-key rate limits shared by every dialect (Flask-Limiter, Redis storage).

Why two scopes: submissions (SD on EKS's 10 requests/s by default) and reads
(status polls, listings: a higher default, so polling clients are never
starved by their own submissions). Each scope is ONE counter per key across
all dialects: a key cannot double its rate by switching API. A key's own
limits come from api.keys[] in config.yaml ("" = unlimited, which also skips
the Redis call).

Routes declare their scope with `@submit_limited` / `@read_limited` (module
level, no limiter needed); `RateLimits.init_app` wraps exactly those views
with the app's own limiter once the blueprints are registered.
"""
from __future__ import annotations

import math
from typing import Callable

from flask import Flask, g
from flask_limiter import Limiter, RateLimitExceeded

from common.store import keys

SUBMIT_SCOPE = "submit"
READ_SCOPE = "read"
SCOPE_ATTRIBUTE = "sdq_limit_scope"


def submit_limited(view: Callable) -> Callable:
    """Mark a route as counted against its key's submission limit (placed under @blp.route)."""
    setattr(view, SCOPE_ATTRIBUTE, SUBMIT_SCOPE)
    return view


def read_limited(view: Callable) -> Callable:
    """Mark a route as counted against its key's read limit (placed under @blp.route)."""
    setattr(view, SCOPE_ATTRIBUTE, READ_SCOPE)
    return view


class RateLimits:
    """The app's limiter and its two shared limits, applied to the views marked with a scope."""

    def __init__(self, settings):
        self.settings = settings
        self.active = limits_configured(settings)
        self.limiter = Limiter(key_func=self._owner, storage_uri=settings.redis.url, strategy="moving-window",
                               key_prefix=keys.RATE_LIMIT_PREFIX, swallow_errors=True, headers_enabled=False,
                               storage_options={"socket_timeout": 2, "socket_connect_timeout": 2})
        if self.active:
            self.submit = self.limiter.shared_limit(self._submit_limit, scope=SUBMIT_SCOPE,
                                                    exempt_when=lambda: not self._submit_limit())
            self.read = self.limiter.shared_limit(self._read_limit, scope=READ_SCOPE,
                                                  exempt_when=lambda: not self._read_limit())
        else:   # nothing to limit: no per-request limiter work at all
            self.submit = self.read = _unchanged

    def init_app(self, app: Flask) -> None:
        """Attach the limiter and wrap every marked view (call after the blueprints are registered)."""
        if not self.active:
            return
        self.limiter.init_app(app)
        decorators = {SUBMIT_SCOPE: self.submit, READ_SCOPE: self.read}
        for endpoint, view in list(app.view_functions.items()):
            scope = getattr(view, SCOPE_ATTRIBUTE, None)
            if scope is not None:
                app.view_functions[endpoint] = decorators[scope](view)

    @staticmethod
    def _owner() -> str:
        key = g.get("api_key")
        return key.owner if key is not None else "anonymous"

    def _submit_limit(self) -> str:
        return self._key_limit("submit_limit")

    def _read_limit(self) -> str:
        return self._key_limit("read_limit")

    def _key_limit(self, name: str) -> str:
        return key_limit(self.settings, g.get("api_key"), name)


def key_limit(settings, key, name: str) -> str:
    """A key's own `name` limit ("submit_limit", "read_limit"), else the api.<name> default ("" = unlimited)."""
    own = getattr(key, name) if key is not None else None
    return getattr(settings.api, name) if own is None else own


def _unchanged(view: Callable) -> Callable:
    return view


def limits_configured(settings) -> bool:
    """Whether any limit exists: a default (api.submit_limit / api.read_limit) or a key's own."""
    if settings.api.submit_limit or settings.api.read_limit:
        return True
    return any(isinstance(k, dict) and (k.get("submit_limit") or k.get("read_limit")) for k in settings.api.keys)


def retry_after(error: RateLimitExceeded) -> str:
    """Seconds until the window that refused the request has room again (at least 1)."""
    try:
        return str(max(1, math.ceil(error.limit.limit.get_expiry())))
    except AttributeError:
        return "1"
