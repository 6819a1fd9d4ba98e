"""The Python client (sdqueue_client) and the `sdq` CLI against the real stack.

Why here and not in client/: the client's promises are about this service's
answers (seeds, Idempotency-Key replays, 422 details, rate limits), so they are
checked against the running stack. Behaviour the stack cannot be made to show
on demand (a 429 then a 202, a stream that drops mid-way) is shown by small
HTTP servers written here: receivers the test controls, not stand-ins for
anything sdqueue runs.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from PIL import Image

from sdqueue_client import (AsyncClient, BadRequest, Client, ConnectionProblem, Event, JobFailed, NotFound,
                            ValidationError)
from sdqueue_client.config import load
from sdqueue_client.errors import render_detail
from sdqueue_client.events import EventParser
from sdqueue_client.files import png_text, save_image
from tests.conftest import KEY_A, KEY_B, KEY_LIMITED
from tests.helpers import FAST, SLOW_JOB, read_parameters

PNG = b"\x89PNG\r\n\x1a\n"
TINY = {"prompt": "a red fox in snow", **FAST}


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.api_url, KEY_A) as c:
        yield c


def events_route_exists(stack) -> bool:
    """The SSE route lands on main separately; until it does, the streaming tests have nothing to stream."""
    response = requests.get(f"{stack.api_url}/api/v1/tasks/{uuid.uuid4()}/events", headers={"X-API-Key": KEY_A},
                            timeout=10)
    return response.status_code == 404 and "任务不存在" in response.text


# -- the library against the stack -------------------------------------------------------------------------
def test_generate_returns_images_with_their_seeds(client):
    result = client.generate(TINY["prompt"], **FAST, num_images=2, seed=42)
    assert result.task["status"] == "completed"
    assert result.seeds == [42, 43]
    assert len(result.urls) == 2
    image = result.download(1)
    assert image.startswith(PNG)
    assert "Seed: 43" in png_text(image, "parameters")


def test_submit_status_queue_and_cancel_a_slow_job(client):
    task_id = client.submit(**SLOW_JOB, seed=5)
    assert client.status(task_id)["status"] in ("pending", "processing")
    assert task_id in [t["task_id"] for t in client.queue()]
    assert client.cancel(task_id)["status"] in ("cancelled", "processing")
    task = client.wait(task_id)
    assert task["status"] == "cancelled"
    with pytest.raises(JobFailed) as failed:
        client.core.result(task, client)
    assert failed.value.status == "cancelled"
    assert task_id not in [t["task_id"] for t in client.queue()]
    assert task_id in [t["task_id"] for t in client.tasks(status="cancelled", limit=100)["tasks"]]


def test_a_failed_job_raises_job_failed_with_the_servers_reason(client):
    with pytest.raises(JobFailed) as failed:
        client.generate(TINY["prompt"], **FAST, loras=[{"name": "broken"}])
    assert failed.value.status == "failed" and "broken" in str(failed.value)
    assert failed.value.task["status"] == "failed"


def test_the_same_idempotency_key_names_the_same_task(client):
    key = f"client-test-{uuid.uuid4()}"
    first = client.submit(**TINY, idempotency_key=key)
    assert client.submit(**TINY, idempotency_key=key) == first
    assert client.submit(**TINY) != first          # a fresh key per submit otherwise
    with pytest.raises(ValidationError) as reused:
        client.submit(**{**TINY, "prompt": "another prompt"}, idempotency_key=key)
    assert "Idempotency-Key" in reused.value.message


def test_errors_are_typed_and_read_as_one_line(client, stack):
    with pytest.raises(ValidationError) as bad:
        client.submit(**{**TINY, "width": 65, "num_inference_steps": 0})
    assert bad.value.status == 422
    assert "\n" not in str(bad.value)
    assert "width: must be a multiple of 8" in str(bad.value) and "num_inference_steps:" in str(bad.value)
    with pytest.raises(NotFound) as missing:
        client.status(str(uuid.uuid4()))
    assert str(missing.value) == "404 任务不存在"
    with Client(stack.api_url, KEY_B) as other, pytest.raises(NotFound):
        other.status(client.submit(**TINY))           # another key's task is not there
    assert render_detail({"headers": {"Idempotency-Key": ["1 to 255 characters"]}}) == \
        "headers.Idempotency-Key: 1 to 255 characters"


def test_rate_limited_reads_are_retried_until_they_pass(stack):
    """KEY_LIMITED reads 4/s: a burst of reads meets 429s, which the client waits out (Retry-After)."""
    with Client(stack.api_url, KEY_LIMITED, retries=8) as limited:
        task_id = limited.submit(**TINY)
        states = [limited.status(task_id)["status"] for _ in range(10)]
    assert set(states) <= {"pending", "processing", "completed"}


def test_asyncio_client_generates_lists_and_downloads(stack):
    async def scenario():
        async with AsyncClient(stack.api_url, KEY_A) as aclient:
            seen: list[Event] = []
            result = await aclient.generate(TINY["prompt"], **FAST, seed=9, on_event=seen.append)
            image = await result.download()
            models = await aclient.models()
            page = await aclient.tasks(limit=5)
            with pytest.raises(ValidationError):
                await aclient.submit(**{**TINY, "height": 7})
            return result, image, models, page, seen

    result, image, models, page, seen = asyncio.run(scenario())
    assert result.seeds == [9] and image.startswith(PNG)
    assert models["default"] in [m["name"] for m in models["models"]]
    assert result.task_id in [t["task_id"] for t in page["tasks"]]
    assert seen[-1].type == "completed" and seen[-1].data["task_id"] == result.task_id


# -- streaming (needs GET /api/v1/tasks/{id}/events on the server) -----------------------------------------
def test_stream_tells_a_job_from_queued_to_completed(client, stack):
    """A job queued behind a slow one is streamed from its wait: queued, then started, progress, completed."""
    if not events_route_exists(stack):
        pytest.skip("GET /api/v1/tasks/{id}/events is not on this branch yet")
    blocker = client.submit(**SLOW_JOB)
    task_id = client.submit(**{**TINY, "num_inference_steps": 6})
    events = []
    for event in client.stream(task_id):
        events.append(event)
        if len(events) == 1:
            client.cancel(blocker)                 # now the worker takes ours
    kinds = [e.type for e in events]
    assert kinds[0] == "queued" and events[0].data["queue_position"] >= 1
    assert kinds[-1] == "completed" and kinds.count("completed") == 1
    assert kinds.index("started") < kinds.index("completed")
    assert all(kinds.index("started") < i for i, k in enumerate(kinds) if k == "progress")
    for e in events:
        if e.type == "progress":
            assert 0 < e.data["step"] <= e.data["total"]
    assert events[-1].data["status"] == "completed" and events[-1].data["task_id"] == task_id
    assert client.status(blocker)["status"] == "cancelled"
    again = list(client.stream(task_id))              # a finished task answers its final event at once
    assert [e.type for e in again] == ["completed"]
    assert list(client.stream(task_id, last_event_id=again[0].id)) == []   # resuming after the end: nothing more


def test_stream_ends_with_failed(client, stack):
    if not events_route_exists(stack):
        pytest.skip("GET /api/v1/tasks/{id}/events is not on this branch yet")
    task_id = client.submit(**TINY, loras=[{"name": "broken"}])
    events = list(client.stream(task_id))
    assert events[-1].type == "failed" and events[-1].data["error_message"]
    assert [e.type for e in events].count("failed") == 1


def test_stream_ends_with_cancelled(client, stack):
    if not events_route_exists(stack):
        pytest.skip("GET /api/v1/tasks/{id}/events is not on this branch yet")
    task_id = client.submit(**SLOW_JOB)
    kinds = []
    for event in client.stream(task_id):
        kinds.append(event.type)
        if event.type in ("queued", "started", "progress") and len(kinds) == 1:
            client.cancel(task_id)
    assert kinds[-1] == "cancelled"


# -- behaviour shown by servers the test controls ----------------------------------------------------------
class Scripted:
    """An HTTP server that answers each request with the next scripted (status, headers, body) and records it;
    a None answer closes the connection without one."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests: list[dict] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                scripted.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                          "body": self.rfile.read(length)})
                answer = scripted.answers.pop(0)
                if answer is None:            # hang up without answering: the request may have been acted on
                    self.close_connection = True
                    return
                status, headers, body = answer
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "Content-Type" not in headers:
                    self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body if isinstance(body, bytes) else json.dumps(body).encode())

            do_GET = do_POST = do_PUT = do_DELETE = handle_any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_429_is_retried_after_the_servers_retry_after_with_the_same_idempotency_key(caplog):
    server = Scripted([(429, {"Retry-After": "1"}, {"detail": "Too many requests"}),
                       (503, {}, {"detail": "task store unavailable; retry shortly"}),
                       (202, {}, {"task_id": "t-1", "status": "pending"})])
    caplog.set_level(logging.INFO, logger="sdqueue_client")
    try:
        with Client(server.url, "k", retries=3) as c:
            assert c.submit(prompt="x") == "t-1"
    finally:
        server.close()
    keys = {r["headers"]["Idempotency-Key"] for r in server.requests}
    assert len(server.requests) == 3 and len(keys) == 1
    assert "in 1.00 s" in caplog.records[0].getMessage() and "HTTP 429" in caplog.records[0].getMessage()
    assert "HTTP 503" in caplog.records[1].getMessage()


def test_other_4xx_are_not_retried_and_retries_are_bounded():
    server = Scripted([(400, {}, {"detail": "Malformed JSON body"})] + [(503, {"Retry-After": "0"}, {"detail": "busy"})] * 3)
    try:
        with Client(server.url, "k", retries=2) as c:
            with pytest.raises(BadRequest):
                c.models()
            with pytest.raises(Exception) as unavailable:
                c.models()
    finally:
        server.close()
    assert str(unavailable.value) == "503 busy"
    assert len(server.requests) == 4        # 1 + (1 + 2 retries)


DROPPED = (b"retry: 10\n\n: keep-alive\n\nid: 1-0\nevent: queued\ndata: {\"queue_position\": 1}\n\n"
           b"id: 2-0\nevent: progress\ndata: {\"step\": 1,\ndata:  \"total\": 2}\n\nevent: progr")
FINAL = b"id: 3-0\nevent: completed\ndata: {\"status\": \"completed\", \"task_id\": \"t\"}\n\n"
STREAM = {"Content-Type": "text/event-stream", "Connection": "close"}


def stream_with_asyncio(url: str) -> list:
    async def collect():
        async with AsyncClient(url, "k") as c:
            return [e async for e in c.stream("t")]
    return asyncio.run(collect())


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_dropped_stream_resumes_after_the_last_event_id(flavour):
    """The first connection ends mid-event, before a final one: the client reconnects with Last-Event-ID."""
    server = Scripted([(200, STREAM, DROPPED), (200, STREAM, FINAL)])
    try:
        if flavour == "sync":
            with Client(server.url, "k") as c:
                events = list(c.stream("t"))
        else:
            events = stream_with_asyncio(server.url)
    finally:
        server.close()
    assert [(e.type, e.id) for e in events] == [("queued", "1-0"), ("progress", "2-0"), ("completed", "3-0")]
    assert events[1].data == {"step": 1, "total": 2}
    assert "Last-Event-ID" not in server.requests[0]["headers"]
    assert server.requests[1]["headers"]["Last-Event-ID"] == "2-0"


def test_a_stream_resumed_after_its_final_event_is_empty_and_wait_reads_the_task():
    task = {"task_id": "t", "status": "completed", "result_url": "http://x/0.png", "seeds": [1]}
    server = Scripted([(204, {}, b""), (200, {}, task)])
    try:
        with Client(server.url, "k") as c:
            assert list(c.stream("t", last_event_id="3-0")) == []
            assert c.poll("t") == task
    finally:
        server.close()
    assert server.requests[0]["headers"]["Last-Event-ID"] == "3-0"


def test_a_missing_events_route_falls_back_to_long_polling():
    task = {"task_id": "t", "status": "completed", "result_url": "http://x/0.png", "seeds": [1]}
    server = Scripted([(202, {}, {"task_id": "t"}), (404, {}, {"detail": "The requested URL was not found"}), (200, {}, task)])
    try:
        with Client(server.url, "k") as c:
            result = c.generate("x")
    finally:
        server.close()
    assert result.urls == ["http://x/0.png"] and result.seeds == [1]
    assert server.requests[2]["path"] == "/api/v1/tasks/t?wait=30"


def test_the_sse_parser_follows_the_whatwg_rules():
    parser = EventParser()
    lines = ["\ufeffretry: 2500", "", ": a comment", "data:no space", "", "id: 7", "event: x", "data: a", "data:",
             "data: b", "", "id", "unknown: field", "data: {\"n\": 1}", "", "retry: soon", "data: tail"]
    events = parser.feed_all(lines)
    assert events == [Event("message", None, "no space"), Event("x", "7", "a\n\nb"), Event("message", "", {"n": 1})]
    assert parser.retry_ms == 2500 and parser.last_event_id == ""


def test_missing_parameters_are_embedded_in_a_png(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    path = save_image(buf.getvalue(), tmp_path / "a.png", "a fox\nSteps: 4, Seed: 3, Size: 8x8 — ü")
    assert read_parameters(path.read_bytes()) == "a fox\nSteps: 4, Seed: 3, Size: 8x8 — ü"
    kept = save_image(path.read_bytes(), tmp_path / "b.png", "something else")
    assert read_parameters(kept.read_bytes()).startswith("a fox")
    assert Image.open(kept).size == (8, 8)


def test_settings_precedence_is_flags_env_file(tmp_path):
    toml = tmp_path / "config.toml"
    toml.write_text('url = "http://file:1"\nkey = "file-key"\nretries = 1\n')
    env = {"SDQ_API_KEY": "env-key"}
    config = load({"url": None, "key": None}, env=env, path=toml)
    assert (config.url, config.key, config.retries) == ("http://file:1", "env-key", 1)
    assert load({"url": "http://flag:2"}, env=env, path=toml).url == "http://flag:2"
    ini = tmp_path / "sdq.ini"
    ini.write_text("[sdq]\nurl = http://ini:3\nkey = ini-key\n")
    assert (load({}, env={}, path=ini).key, load({}, env={}, path=tmp_path / "none.toml").url) == \
        ("ini-key", "http://localhost:8000")


# -- the CLI as a subprocess -------------------------------------------------------------------------------
def sdq(stack, *args: str, key: str = KEY_A, url: str | None = None, cwd: Path | None = None):
    env = {**os.environ, "SDQ_URL": url or stack.api_url, "SDQ_API_KEY": key, "XDG_CONFIG_HOME": "/nonexistent"}
    return subprocess.run([sys.executable, "-m", "sdqueue_client", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_generate_writes_files_named_with_their_seeds(stack, tmp_path):
    run = sdq(stack, "generate", "a lighthouse", "-n", "2", "--size", "64x64", "--steps", "4", "--seed", "7",
              "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    paths = [Path(line) for line in run.stdout.split()]
    assert sorted(p.name.split("-", 5)[-1] for p in paths) == ["0-seed7.png", "1-seed8.png"]
    for path in paths:
        assert path.parent == tmp_path and "Seed: " in read_parameters(path.read_bytes())
    task_id = paths[0].name[:36]
    status = sdq(stack, "status", task_id)
    assert status.returncode == 0 and "completed" in status.stdout and "7, 8" in status.stdout
    as_json = sdq(stack, "status", task_id, "--json")
    assert json.loads(as_json.stdout)["seeds"] == [7, 8]


def test_cli_generate_draws_a_progress_bar_per_job(stack, tmp_path):
    run = sdq(stack, "generate", "a fox", "a heron", "--size", "64x64", "--steps", "4", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.split()) == 2
    for path in run.stdout.split():          # each job's bar (labelled with its task id) reached its end
        assert re.search(rf"{Path(path).name[:8]}: 100%\|[^\r\n]*completed", run.stderr), run.stderr


def test_cli_queue_shows_waiting_and_running_jobs(stack, client):
    task_id = client.submit(**SLOW_JOB)
    try:
        run = sdq(stack, "queue")
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("TASK") and task_id in run.stdout
    finally:
        cancelled = sdq(stack, "cancel", task_id)
    assert cancelled.returncode == 0 and task_id in cancelled.stdout
    models = sdq(stack, "models")
    assert models.returncode == 0 and "sdq-tiny" in models.stdout


def test_cli_a_bad_request_is_one_line_and_exit_1(stack):
    run = sdq(stack, "generate", "a fox", "--size", "65x64", "--steps", "4")
    assert run.returncode == 1
    assert run.stderr.splitlines() == ["sdq: error: 422 width: must be a multiple of 8"]
    missing = sdq(stack, "status", str(uuid.uuid4()))
    assert missing.returncode == 1 and missing.stderr.startswith("sdq: error: 404")
    usage = sdq(stack, "generate", "a fox", "--size", "big")
    assert usage.returncode == 2


def test_cli_an_unreachable_service_exits_3(stack):
    run = sdq(stack, "--retries", "1", "models", url="http://127.0.0.1:9")
    assert run.returncode == 3
    assert len(run.stderr.splitlines()) == 1 and "cannot reach http://127.0.0.1:9" in run.stderr


def test_cli_watch_prints_events_to_the_end(stack, client):
    task_id = client.submit(**TINY)
    run = sdq(stack, "watch", task_id)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1].startswith("completed")
    failed = client.submit(**SLOW_JOB)
    client.cancel(failed)
    run = sdq(stack, "watch", failed)
    assert run.returncode == 1 and "cancelled" in run.stderr
