"""The web playground: static files at /ui that drive the public native API from a browser.

Why a plain Flask blueprint (not flask-smorest's): the files are not API
operations, so they stay out of /openapi.json (and out of the fuzzer's reach).
Why no key here: the page holds nothing secret; it asks the user for a key and
sends it only to the API, from the browser. Why no build step: three files,
edited as they are served.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

STATIC_DIR = Path(__file__).resolve().parent / "ui" / "static"
# Self only, except images: result URLs point at an S3 endpoint not known in advance, and
# previews are data: URLs. No inline script or style, no framing, no plugins.
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "connect-src 'self'",
    "img-src * data: blob:",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))
# Unversioned file names: the browser revalidates each time (a cheap 304), so an upgrade never
# pairs a new page with an old script.
CACHE_CONTROL = "no-cache"

blp = Blueprint("playground", __name__)


@blp.route("/ui/", methods=["GET"])
def index():
    """The page; /ui redirects here (strict slashes), so its relative asset and API URLs resolve under /ui/."""
    return send_from_directory(STATIC_DIR, "index.html")


@blp.route("/ui/<path:filename>", methods=["GET"])
def asset(filename: str):
    """A script, style sheet or icon of the page (404 for anything else)."""
    return send_from_directory(STATIC_DIR, filename)


@blp.after_request
def secure_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Cache-Control"] = CACHE_CONTROL
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
