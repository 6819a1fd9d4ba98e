"""The web playground at /ui, driven in headless Chromium (Playwright) against the real stack.

Why a real browser: the page's job is what a person sees and does (fill the form, watch the
bar, reuse a result, cancel from the queue, read the API's error), and only a browser runs
its JavaScript, its CSP and its layout. Playwright's own browser download is not reachable
here, so the test launches the system's Chromium (`make test-deps` installs Debian's).
No timing assertions: every wait is Playwright's auto-waiting expect() with a generous timeout.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

import pytest
import requests
from playwright import sync_api as playwright_api   # requirements-dev.txt: missing is a broken install, not a skip
from playwright.sync_api import expect

from tests.conftest import KEY_B
from tests.helpers import SLOW_JOB, Api, wait_until

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "bench" / "out"
LONG_MS = 180_000        # a hang guard for a job on the suite's one CPU worker, not a timing claim
SHORT_MS = 30_000
PHONE = {"width": 375, "height": 667}
DESKTOP = {"width": 1280, "height": 900}


def chromium_path() -> str | None:
    """The system's Chromium: $SDQ_CHROMIUM, then chromium / chromium-browser on PATH."""
    candidates = (os.environ.get("SDQ_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                  "/usr/bin/chromium")
    return next((c for c in candidates if c and os.path.exists(c)), None)


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium found (chromium, chromium-browser or $SDQ_CHROMIUM); `make test-deps` installs "
                    "Debian's with apt-get")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path)
        yield launched
        launched.close()


class Playground:
    """One browser page on /ui, with what the tests do and look at by name."""

    def __init__(self, page, base: str):
        self.page = page
        self.base = base
        self.errors: list[str] = []
        self.responses: list[tuple[str, int, str]] = []   # (url, status, content type) of the API's answers
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("console", self.console)
        page.on("response", lambda r: self.responses.append((r.url, r.status, r.headers.get("content-type", ""))))

    def console(self, message) -> None:
        if "Content Security Policy" in message.text:   # a blocked script, style or image is a bug of the page
            self.errors.append(f"CSP: {message.text}")

    def open(self, key: str = KEY_B) -> "Playground":
        self.page.goto(self.base + "/ui")
        self.page.get_by_label("Your key").fill(key)
        self.page.get_by_label("Your key").press("Tab")   # the change event loads models and queue
        expect(self.page.locator("#model option[value='sdq-tiny']")).to_have_count(1, timeout=SHORT_MS)
        return self

    def fill(self, **fields) -> None:
        for name, value in fields.items():
            control = self.page.locator(f"#generate-form [name='{name}']")
            if control.evaluate("e => e.tagName") == "SELECT":
                control.select_option(str(value))
            else:
                control.fill(str(value))

    def generate(self, **fields) -> str:
        """Fill the form, press Generate, and answer the new job's task id."""
        self.fill(model="sdq-tiny", **fields)
        status = self.page.locator("#job-status")
        previous = status.get_attribute("data-task-id") or "none"
        self.page.get_by_role("button", name="Generate").click()
        expect(status).to_have_attribute("data-task-id", re.compile(rf"^(?!{previous}$)[0-9a-f-]{{36}}$"),
                                         timeout=SHORT_MS)
        return status.get_attribute("data-task-id")

    @property
    def progress(self):
        return self.page.locator("#job-progress")

    def card(self, prompt: str):
        return self.page.locator("#gallery .card").filter(has_text=prompt)

    def wait_for_progress(self, below_one: bool = False) -> float:
        """The bar's value once it is above 0 (and below 1, when asked). Polled with evaluate(): the
        page's CSP forbids the eval that Playwright's wait_for_function needs, and rightly so."""
        def moved():
            value = self.progress.evaluate("bar => bar.value")
            return value if value > 0 and (value < 1 or not below_one) else None
        try:
            return wait_until(moved, timeout=LONG_MS / 1000, what="the progress bar to move")
        except AssertionError as error:
            raise AssertionError(f"{error}; bar at {self.progress.evaluate('bar => bar.value')}, "
                                 f"status: {self.page.locator('#job-status').text_content()}") from None

    def answers_for(self, task_id: str) -> list[tuple[str, int, str]]:
        return [answer for answer in self.responses if f"/tasks/{task_id}" in answer[0]]

    def horizontal_overflow(self) -> int:
        return self.page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")


@pytest.fixture
def playground(browser, stack):
    context = browser.new_context(viewport=DESKTOP)
    page = Playground(context.new_page(), stack.api_url)
    yield page
    context.close()
    assert not page.errors, page.errors


def unique(prompt: str) -> str:
    return f"{prompt} {uuid.uuid4().hex[:8]}"


def test_static_files_are_served_outside_the_api_description(stack):
    """/ui is the page (through /ui/, for its relative URLs), with a strict CSP; no operation in /openapi.json."""
    page = requests.get(stack.api_url + "/ui", timeout=10)
    assert page.status_code == 200 and page.url.endswith("/ui/")
    assert page.headers["Content-Type"].startswith("text/html")
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy and "img-src * data: blob:" in policy
    assert page.headers["Cache-Control"] == "no-cache"
    script = requests.get(stack.api_url + "/ui/app.js", timeout=10)
    assert script.status_code == 200 and "javascript" in script.headers["Content-Type"]
    assert requests.get(stack.api_url + "/prod/ui/app.js", timeout=10).status_code == 200   # api.stage_prefix
    missing = requests.get(stack.api_url + "/ui/no-such-file.js", timeout=10)
    assert missing.status_code == 404 and "detail" in missing.json()
    paths = requests.get(stack.api_url + "/openapi.json", timeout=10).json()["paths"]
    assert not [p for p in paths if p.startswith("/ui")]


def test_every_control_has_a_label(playground):
    playground.open()
    unlabelled = playground.page.evaluate(
        "[...document.querySelectorAll('input, select, textarea, progress')]"
        ".filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)")
    assert unlabelled == []


def test_generate_shows_progress_and_the_result_with_its_seed(playground):
    prompt = unique("a lighthouse on a cliff")
    playground.open()
    task_id = playground.generate(prompt=prompt, width=64, height=64, num_inference_steps=6, seed=4242,
                                  preview_every=2)
    playground.wait_for_progress()
    card = playground.card(prompt)
    expect(card).to_have_count(1, timeout=LONG_MS)
    expect(card.locator(".param-seed")).to_have_text("4242")
    expect(card.locator(".param-size")).to_have_text("64 × 64")
    expect(card.locator(".param-model")).to_have_text("sdq-tiny")
    image = card.locator("img")
    expect(image).to_have_attribute("src", re.compile(r"^https?://"))
    expect(image).to_have_js_property("complete", True, timeout=SHORT_MS)
    assert image.evaluate("img => img.naturalWidth") == 64   # the S3 URL loaded (the CSP lets it)
    expect(playground.page.locator("#job-status")).to_contain_text("Done: 1 image")
    # Followed on the event stream (docs/events.md), not by the long-polling fallback.
    answers = playground.answers_for(task_id)
    assert any(url.endswith("/events") and status == 200 and kind.startswith("text/event-stream")
               for url, status, kind in answers), answers
    assert not [url for url, _, _ in answers if "wait=" in url], answers
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    playground.page.screenshot(path=str(SCREENSHOTS / "playground.png"), full_page=True)


def test_reuse_these_settings_fills_the_form(playground):
    prompt = unique("a red fox in snow")
    playground.open()
    playground.generate(prompt=prompt, negative_prompt="blurry", width=64, height=72, num_inference_steps=3,
                        guidance_scale=6.5, seed=100, num_images=2, scheduler="EulerDiscreteScheduler")
    cards = playground.card(prompt)
    expect(cards).to_have_count(2, timeout=LONG_MS)
    expect(cards.nth(1).locator(".param-seed")).to_have_text("101")   # image n uses seed + n, in order
    playground.fill(prompt="something else", negative_prompt="", width=128, height=128, num_inference_steps=30,
                    guidance_scale=7.5, seed="", num_images=3, scheduler="")
    cards.nth(1).get_by_role("button", name=re.compile("Reuse these settings")).click()
    form = playground.page.locator("#generate-form")
    expected = {"prompt": prompt, "negative_prompt": "blurry", "width": "64", "height": "72",
                "num_inference_steps": "3", "guidance_scale": "6.5", "seed": "101", "num_images": "1",
                "model": "sdq-tiny", "scheduler": "EulerDiscreteScheduler"}
    for name, value in expected.items():
        expect(form.locator(f"[name='{name}']")).to_have_value(value)
    expect(form.locator("[name='prompt']")).to_be_focused()


def test_a_refused_request_shows_the_apis_message_naming_the_field(playground):
    playground.open()
    playground.fill(prompt="an odd size", width=100, height=64)
    playground.page.locator("#width").press("Enter")   # the keyboard submits the form too
    messages = playground.page.get_by_role("alert")
    expect(messages).to_contain_text("width", timeout=SHORT_MS)
    expect(messages).to_contain_text("multiple of 8")
    expect(playground.page.locator("#width")).to_have_attribute("aria-invalid", "true")
    expect(playground.page.locator("#height")).not_to_have_attribute("aria-invalid", "true")


def test_cancel_a_long_job_from_the_queue(playground, stack):
    prompt = unique(SLOW_JOB["prompt"])
    playground.open()
    task_id = playground.generate(prompt=prompt, width=SLOW_JOB["width"], height=SLOW_JOB["height"],
                                  num_inference_steps=SLOW_JOB["num_inference_steps"])
    row = playground.page.locator("#queue li").filter(has_text=prompt[:30])
    expect(row).to_have_count(1, timeout=SHORT_MS)
    # The bar moves while the job runs (strictly between 0 and 1: the job is far from done).
    playground.wait_for_progress(below_one=True)
    # From the keyboard: the focus stays on the job's Cancel button while the list refreshes around it.
    row.get_by_role("button", name=re.compile("^Cancel job")).focus()
    expect(row).not_to_have_text(row.text_content(), timeout=SHORT_MS)   # a refresh showed new progress
    playground.page.keyboard.press("Enter")
    expect(playground.page.locator("#job-status")).to_contain_text("Cancelled", timeout=LONG_MS)
    expect(row).to_have_count(0, timeout=SHORT_MS)
    assert Api(stack.api_url, KEY_B).task(task_id)["status"] == "cancelled"


def test_a_phone_sized_screen_has_no_horizontal_scroll(browser, stack):
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    playground = Playground(context.new_page(), stack.api_url).open()
    prompt = unique("a very long prompt " + "with many words " * 8)
    playground.generate(prompt=prompt, width=64, height=64, num_inference_steps=2)
    expect(playground.card(prompt)).to_have_count(1, timeout=LONG_MS)
    playground.fill(width=100)
    playground.page.get_by_role("button", name="Generate").click()
    expect(playground.page.get_by_role("alert")).to_contain_text("width", timeout=SHORT_MS)
    assert playground.horizontal_overflow() <= 0
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    playground.page.screenshot(path=str(SCREENSHOTS / "playground-phone.png"), full_page=True)
    context.close()
    assert not playground.errors, playground.errors


def test_the_event_stream_parser_reads_the_whatwg_format(playground):
    """sse.js's parser, fed in awkward chunks: CRLF split between chunks, comments, retry, multi-line data,
    ids kept for Last-Event-ID, an event without data not dispatched."""
    playground.open()
    events = playground.page.evaluate("""async () => {
        const {SseParser} = await import('./sse.js');
        const seen = []; let retry = null;
        const parser = new SseParser(e => seen.push(e), ms => { retry = ms; });
        for (const chunk of ['retry: 2000\\r', '\\n\\r\\n: keep-alive\\n', 'id: 17-0\\nevent: prog', 'ress\\ndata: {"step"',
                             ': 1}\\n\\n', 'event: nothing\\n\\n', 'data: a\\ndata:b\\r\\rid: 18-0\\rdata: {}\\r\\r'])
            parser.push(chunk);
        return {seen, retry, last: parser.lastEventId};
    }""")
    assert events["retry"] == 2000
    assert events["seen"] == [
        {"id": "17-0", "event": "progress", "data": '{"step": 1}'},
        {"id": "17-0", "event": "message", "data": "a\nb"},
        {"id": "18-0", "event": "message", "data": "{}"},
    ]
    assert events["last"] == "18-0"


def test_a_dropped_stream_resumes_with_last_event_id(playground):
    """The first stream ends before the final event (as a proxy or api.stream_seconds would end it): the
    page reconnects with Last-Event-ID of the last event it read and gets the end from the server."""
    prompt = unique("a resumed stream")
    asked_after: list[str | None] = []
    kept_ids: list[str] = []

    def cut_before_the_end(route):
        asked_after.append(route.request.headers.get("last-event-id"))
        if len(asked_after) > 1:
            return route.continue_()
        blocks = [b for b in route.fetch().text().split("\n\n") if b.strip()]
        kept = [b for b in blocks if "event: completed" not in b and not b.startswith("retry:")]
        kept_ids.extend(line[4:] for b in kept for line in b.splitlines() if line.startswith("id: "))
        route.fulfill(status=200, content_type="text/event-stream",
                      body="retry: 50\n\n" + "".join(b + "\n\n" for b in kept))

    playground.page.route(re.compile(r"/api/v1/tasks/[^/?]+/events"), cut_before_the_end)
    playground.open()
    # long enough that the stream opened after the 202 holds events before the end (a finished task's holds only it)
    playground.generate(prompt=prompt, width=128, height=128, num_inference_steps=30)
    expect(playground.card(prompt)).to_have_count(1, timeout=LONG_MS)
    assert kept_ids and asked_after == [None, kept_ids[-1]]


def test_without_the_event_stream_the_page_long_polls(playground):
    """A service without the events route (or with every stream slot taken) is followed by ?wait= polls."""
    prompt = unique("a polled job")
    playground.page.route(re.compile(r"/api/v1/tasks/[^/?]+/events"),
                          lambda route: route.fulfill(status=404, json={"detail": "Not Found"}))
    playground.open()
    task_id = playground.generate(prompt=prompt, width=64, height=64, num_inference_steps=3)
    expect(playground.card(prompt)).to_have_count(1, timeout=LONG_MS)
    assert [url for url, status, _ in playground.answers_for(task_id) if "wait=" in url and status == 200]
    expect(playground.page.get_by_role("alert")).to_be_empty()


def test_a_preview_event_shows_the_image_as_it_forms(playground):
    """With Preview every set, the worker's previews (SSE `preview` events) show under the bar as the job runs."""
    playground.open()
    prompt = unique("a preview")
    playground.generate(prompt=prompt, width=256, height=256, num_inference_steps=60, preview_every=2)
    figure = playground.page.get_by_role("figure")
    expect(figure).to_be_visible(timeout=LONG_MS)
    expect(figure.get_by_role("img")).to_have_attribute("src", re.compile(r"^data:image/jpeg;base64,"),
                                                        timeout=LONG_MS)
    expect(figure).to_contain_text(re.compile(r"step \d+ of \d+"))
    expect(playground.card(prompt)).to_have_count(1, timeout=LONG_MS)
