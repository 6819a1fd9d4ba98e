"""An API Gateway-style stage prefix: every route also answers under /{stage}/.

Why: clients of SD on EKS and of the AWS SD extension API are configured with a base URL such as
https://host/prod and append their paths to it; stripping the stage in
WSGI serves them with the same routes, without registering each twice.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable


class StagePrefix:
    """WSGI middleware: /prod/x is served as /x (with /prod moved to SCRIPT_NAME)."""

    def __init__(self, app: Callable, stage: str):
        self.app = app
        self.stage = "/" + stage.strip("/")

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == self.stage or path.startswith(self.stage + "/"):
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + self.stage
            environ["PATH_INFO"] = path[len(self.stage):] or "/"
        return self.app(environ, start_response)
