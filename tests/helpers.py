"""Test helpers: an HTTP client for the native API, images, LoRA and receivers."""
from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import requests
from PIL import Image

from worker.images import EXIF_IFD, USER_COMMENT

SLOW_JOB = {"prompt": "a slow painting of a harbour", "width": 256, "height": 256, "num_inference_steps": 150}
FAST = {"width": 64, "height": 64, "num_inference_steps": 4}


@dataclass
class Api:
    """The native API as a client sees it."""

    base: str
    key: str
    header: str = "X-API-Key"

    def headers(self, key: str | None = None) -> dict:
        return {self.header: self.key if key is None else key}

    def post(self, path: str, body=None, key: str | None = None, **kw) -> requests.Response:
        return requests.post(self.base + path, json=body, headers=self.headers(key), timeout=30, **kw)

    def get(self, path: str, key: str | None = None, **kw) -> requests.Response:
        return requests.get(self.base + path, headers=self.headers(key), timeout=90, **kw)

    def put(self, path: str, body=None, key: str | None = None, **kw) -> requests.Response:
        return requests.put(self.base + path, json=body, headers=self.headers(key), timeout=30, **kw)

    def delete(self, path: str, key: str | None = None) -> requests.Response:
        return requests.delete(self.base + path, headers=self.headers(key), timeout=30)

    def submit(self, **body) -> str:
        response = self.post("/api/v1/generate", {"prompt": "a red fox in snow", **FAST, **body})
        assert response.status_code == 202, response.text
        return response.json()["task_id"]

    def task(self, task_id: str, wait: float = 0) -> dict:
        response = self.get(f"/api/v1/tasks/{task_id}" + (f"?wait={wait}" if wait else ""))
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, task_id: str, timeout: float = 120) -> dict:
        """Long-poll until the task is terminal (fails the test after `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.task(task_id, wait=min(30, max(1, deadline - time.monotonic())))
            if body["status"] in ("completed", "failed", "cancelled"):
                return body
        raise AssertionError(f"task {task_id} not finished after {timeout}s: {body}")

    def wait_for(self, task_id: str, predicate, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.task(task_id)
            if predicate(body):
                return body
            time.sleep(0.05)
        raise AssertionError(f"task {task_id} never matched: {body}")

    def run(self, **body) -> dict:
        return self.wait(self.submit(**body))


@dataclass
class Sse:
    """One server-sent event as a client reads it."""

    kind: str
    data: dict
    id: str | None = None


def read_sse(response: requests.Response) -> Iterator[Sse]:
    """The events of an open text/event-stream response (comments and retry lines skipped)."""
    kind, data, event_id = "message", [], None
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if data:
                yield Sse(kind, json.loads("\n".join(data)), event_id)
            kind, data, event_id = "message", [], None
        elif line.startswith(":") or line.startswith("retry:"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value


def stream_events(api: "Api", task_id: str, last_id: str | None = None, key: str | None = None,
                  until: Callable[[Sse], bool] | None = None, timeout: float = 120) -> list[Sse]:
    """Every event of a task's stream until it closes (or until `until(event)` holds)."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    with requests.get(f"{api.base}/api/v1/tasks/{task_id}/events", headers={**api.headers(key), **headers},
                      stream=True, timeout=timeout) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = []
        for event in read_sse(response):
            events.append(event)
            if until is not None and until(event):
                break
        return events


def wait_until(predicate: Callable[[], Any], timeout: float = 120, what: str = "") -> Any:
    """The first truthy value of `predicate`, polled; an AssertionError after `timeout` (a hang guard, not a
    timing claim)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or 'a condition'}")


def fetch(url: str) -> bytes:
    response = requests.get(url, timeout=30)
    assert response.status_code == 200, (url, response.status_code, response.text[:200])
    return response.content


def pixels(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def gradient(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata([((x * 255) // width, (y * 255) // height, 128) for y in range(height) for x in range(width)])
    return image


@dataclass
class Receiver:
    """A webhook receiver on loopback that fails its first `fail_first` deliveries."""

    fail_first: int = 0
    received: list[dict] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def __post_init__(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.received.append({"body": body, "headers": dict(self.headers), "path": self.path})
                failing = len(receiver.received) <= receiver.fail_first
                self.send_response(500 if failing else 200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"status": "ok"}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/callback"

    def wait(self, count: int, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.received) >= count, f"only {len(self.received)} deliveries"
        return self.received

    def close(self):
        self.server.shutdown()


def expected_signature(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def build_test_lora(model_dir: Path, out_file: Path, seed: int = 7) -> None:
    """A LoRA for the tiny UNet with random (non-zero) B matrices, so it visibly changes pixels."""
    from dev.tinymodel import build_tiny_lora   # works for every tiny family (SD 1.x, SDXL, SD3, Flux)

    build_tiny_lora(model_dir, out_file, seed=seed)


def json_of(data: bytes) -> dict:
    return json.loads(data.decode())


ALLOWED_HOST = "127.0.0.2"      # downloads.allow_hosts in the test stack


class FileServer:
    """Serves a few files (and a redirect) over HTTP on ALLOWED_HOST, as a model hub would."""

    def __init__(self, files: dict[str, bytes], redirects: dict[str, str]):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path in redirects:
                    self.send_response(307)
                    self.send_header("Location", redirects[self.path])
                    self.end_headers()
                    return
                data = files.get(self.path)
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((ALLOWED_HOST, 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        server.port = self.httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://{ALLOWED_HOST}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()


def read_parameters(data: bytes) -> str | None:
    """The parameters text worker/images.py embedded in an encoded image (PNG text chunk or EXIF), if any."""
    image = Image.open(io.BytesIO(data))
    if "parameters" in image.info:
        return image.info["parameters"]
    raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(raw, bytes) and raw.startswith(b"UNICODE\0"):
        return raw[8:].decode("utf-16-be")
    return raw if isinstance(raw, str) else None
