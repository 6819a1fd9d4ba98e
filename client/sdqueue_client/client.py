"""The synchronous client: Client(url, key).generate("a prompt").

Why this shape: everything about the API lives in core.Core; this class only
sends Calls with httpx, sleeps between retries and reads event streams.
sdqueue_client.aio.AsyncClient is the same file with `await`.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import httpx

from sdqueue_client.core import (DEFAULT_TIMEOUT, DEFAULT_URL, LONG_POLL_SECONDS, NO_MORE_EVENTS, PAGE, QUEUE_STATUSES,
                                 Call, Core, DatasetFiles, Result, collect_files, dataset_entries, is_final,
                                 queue_order, read_source, upload_urls)
from sdqueue_client.errors import (ConnectionProblem, MethodNotAllowed, NotFound, SdqError, StreamBroken,
                                   Unavailable)
from sdqueue_client.events import Event, EventParser
from sdqueue_client.retry import DEFAULT_RETRIES, log_retry

OnEvent = Optional[Callable[[Event], Any]]


class Client:
    """sdqueue's native API. Methods raise ApiError subclasses for error answers, ConnectionProblem when the
    service cannot be reached after `retries` retries, and JobFailed when generate's or train's job fails."""

    def __init__(self, url: str = DEFAULT_URL, key: Optional[str] = None, *, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, header: str = "X-API-Key"):
        self.core = Core(url, key, timeout=timeout, retries=retries, header=header)
        self._http = httpx.Client(**self.core.http_options())

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- the API -------------------------------------------------------------------------------------------
    def generate(self, prompt: str, *, on_event: OnEvent = None, idempotency_key: Optional[str] = None,
                 **params: Any) -> Result:
        """Submit a job and wait for its end; `on_event` sees each event (progress bars). JobFailed if it fails."""
        task_id = self.submit(prompt=prompt, idempotency_key=idempotency_key, **params)
        return self.core.result(self.wait(task_id, on_event=on_event), self)

    def submit(self, *, idempotency_key: Optional[str] = None, **params: Any) -> str:
        """Queue a job (the fields of POST /api/v1/generate); its task id. Retries reuse one Idempotency-Key."""
        return self._json(self.core.submit(params, idempotency_key))["task_id"]

    def status(self, task_id: str, wait: float = 0) -> Dict[str, Any]:
        """The task as GET /api/v1/tasks/{id} shows it; `wait` > 0 long-polls up to that many seconds."""
        return self._json(self.core.status(task_id, wait))

    def cancel(self, task_id: str) -> Dict[str, Any]:
        """Cancel a task; the task after the request (cancelled, or still processing for a moment)."""
        return self._json(self.core.cancel(task_id))

    def models(self) -> Dict[str, Any]:
        return self._json(self.core.models())

    def loras(self) -> List[Dict[str, Any]]:
        """The LoRAs this key may use: the shared directory's, then its own (`source: own`, trained or uploaded)."""
        return self._json(self.core.loras())["loras"]

    def delete_lora(self, name: str) -> None:
        """Delete one of this key's own LoRAs (NotFound when it has none of that name)."""
        self._send(self.core.delete_lora(name))

    def tasks(self, status: Optional[str] = None, limit: int = 20, offset: int = 0) -> Dict[str, Any]:
        """One page of this key's tasks, newest first: {"tasks", "total", "limit", "offset"}."""
        return self._json(self.core.tasks(status, limit, offset))

    def queue(self) -> List[Dict[str, Any]]:
        """This key's running and waiting tasks, running first, then by queue position."""
        found: List[Dict[str, Any]] = []
        for status in QUEUE_STATUSES:
            offset = 0
            while True:
                page = self.tasks(status=status, limit=PAGE, offset=offset)
                found += page["tasks"]
                offset += len(page["tasks"])
                if not page["tasks"] or offset >= page["total"]:
                    break
        return queue_order(found)

    def download(self, url: str) -> bytes:
        """An image's bytes (its URL is presigned: the API key is not sent)."""
        return self._send(self.core.download(url)).content

    # -- datasets and training -----------------------------------------------------------------------------
    def create_dataset(self, name: str, files: DatasetFiles, *, captions: Optional[Mapping[str, str]] = None,
                       params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Create a dataset, PUT each file to its presigned URL, enable it; the enabled dataset's body.

        `files` maps file names to bytes or paths (`photo.txt` beside `photo.png` is its caption), or is a
        folder (its images and their captions); `captions` gives images captions inline. When an upload or the
        service's check of the files fails, the half-made dataset is deleted, so the name is free for a retry.
        """
        sources = collect_files(files)
        created = self._json(self.core.create_dataset(name, dataset_entries(sources, captions), params))
        try:
            for file_name, url in upload_urls(created):
                self._send(self.core.upload(url, read_source(sources[file_name])))
            return self._json(self.core.enable_dataset(name))
        except (SdqError, OSError):
            self._forget_dataset(name)
            raise

    def _forget_dataset(self, name: str) -> None:
        """Delete a dataset we failed to finish; the error that stopped us matters more than this one."""
        try:
            self.delete_dataset(name)
        except SdqError:
            pass

    def datasets(self) -> List[Dict[str, Any]]:
        """This key's datasets, oldest first, each with its files."""
        return self._json(self.core.datasets())["datasets"]

    def dataset(self, name: str) -> Dict[str, Any]:
        return self._json(self.core.dataset(name))

    def delete_dataset(self, name: str) -> None:
        """Remove a dataset and its files; jobs already submitted keep what they captured."""
        self._send(self.core.delete_dataset(name))

    def train(self, dataset: str, *, on_event: OnEvent = None, **params: Any) -> Dict[str, Any]:
        """Train a LoRA on an enabled dataset and wait for it; the training body (`lora["name"]` is usable at
        once in `loras`). `on_event` sees each event (progress carries `loss`). JobFailed if it fails or is
        cancelled."""
        training_id = self.start_training(dataset, **params)
        self.core.trained(self.wait(training_id, on_event=on_event))
        return self.training(training_id)

    def start_training(self, dataset: str, *, idempotency_key: Optional[str] = None, **params: Any) -> str:
        """Queue a training job (the fields of POST /api/v1/trainings); its id, which is also its task id."""
        return self._json(self.core.start_training(dataset, params, idempotency_key))["id"]

    def training(self, training_id: str) -> Dict[str, Any]:
        """A training job: progress, loss and loss curve, and `lora` once completed."""
        return self._json(self.core.training(training_id))

    def trainings(self, limit: int = 20, offset: int = 0) -> Dict[str, Any]:
        """One page of this key's training jobs, newest first: {"trainings", "total", "limit", "offset"}."""
        return self._json(self.core.trainings(limit, offset))

    def cancel_training(self, training_id: str) -> Dict[str, Any]:
        """Cancel a training job (it stops after its current step; no LoRA is made); its body after the request."""
        return self._json(self.core.cancel_training(training_id))

    def wait(self, task_id: str, on_event: OnEvent = None) -> Dict[str, Any]:
        """The task once it ended: from its event stream, or by long polling where there is none."""
        events = self.stream(task_id)
        try:
            for event in events:
                if on_event:
                    on_event(event)
                if event.final:
                    return event.data if isinstance(event.data, dict) else self.status(task_id)
        except (NotFound, MethodNotAllowed, Unavailable, ConnectionProblem):
            pass                  # no events route (an older server), no stream slot, or a stream that broke
        finally:
            events.close()        # closes the connection now, not when the generator is collected
        return self.poll(task_id, on_event)

    def poll(self, task_id: str, on_event: OnEvent = None) -> Dict[str, Any]:
        """Long-poll ?wait= until the task ends; `on_event` gets one final event."""
        while True:
            task = self.status(task_id, wait=LONG_POLL_SECONDS)
            if is_final(task):
                if on_event:
                    on_event(Event(task["status"], None, task))
                return task

    def stream(self, task_id: str, last_event_id: Optional[str] = None) -> Iterator[Event]:
        """The task's events until its final one; a dropped connection resumes after the last event id.

        Resuming after the final event itself (the server answers 204) yields nothing.
        """
        parser = EventParser(last_event_id)
        drops = 0                 # connections in a row that ended before any event
        while True:
            response = self._send(self.core.events(task_id, parser.last_event_id), stream=True)
            if response.status_code == NO_MORE_EVENTS:
                response.close()
                return            # the id we resumed after was the task's final event
            got_event = False
            try:
                for line in response.iter_lines():
                    for event in parser.feed(line):
                        got_event = True
                        yield event
                        if event.final:
                            return
            except httpx.TransportError:
                pass              # dropped mid-stream: resume below
            finally:
                response.close()
            drops = 0 if got_event else drops + 1
            if self.core.stream_gave_up(drops):
                raise StreamBroken(f"the events stream of task {task_id} broke {drops} times without an event")
            time.sleep(self.core.reconnect_delay(parser, drops))

    # -- sending -------------------------------------------------------------------------------------------
    def _json(self, call: Call) -> Any:
        return self._send(call).json()

    def _send(self, call: Call, stream: bool = False) -> httpx.Response:
        """Send `call`, retrying what the policy retries; the successful response, else its error raised."""
        attempt = 0
        while True:
            request = self.core.build(self._http, call)
            try:
                outcome: Any = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                outcome = exc
            delay = self.core.policy.delay(attempt, outcome, call.replayable)
            if delay is None:
                break
            if isinstance(outcome, httpx.Response):
                outcome.close()
            log_retry(request, outcome, delay, attempt)
            time.sleep(delay)
            attempt += 1
        if isinstance(outcome, httpx.TransportError):
            raise self.core.unreachable(request, outcome) from outcome
        if outcome.is_error and stream:
            outcome.read()
        return self.core.check(outcome)

