"""The asyncio client: `await AsyncClient(url, key).generate("a prompt")`.

Why a mirror of client.py: the same Core builds every call and parses every
answer, so only the sending (await, asyncio.sleep, async iteration) differs.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Dict, List, Mapping, Optional

import httpx

from sdqueue_client.core import (DEFAULT_TIMEOUT, DEFAULT_URL, LONG_POLL_SECONDS, NO_MORE_EVENTS, PAGE, QUEUE_STATUSES,
                                 Call, Core, DatasetFiles, Result, collect_files, dataset_entries, is_final,
                                 queue_order, read_source, upload_urls)
from sdqueue_client.errors import (ConnectionProblem, MethodNotAllowed, NotFound, SdqError, StreamBroken,
                                   Unavailable)
from sdqueue_client.events import Event, EventParser
from sdqueue_client.retry import DEFAULT_RETRIES, log_retry

OnEvent = Optional[Callable[[Event], Any]]


class AsyncClient:
    """Client's methods as coroutines; `stream` is an async iterator; Result.download returns an awaitable."""

    def __init__(self, url: str = DEFAULT_URL, key: Optional[str] = None, *, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, header: str = "X-API-Key"):
        self.core = Core(url, key, timeout=timeout, retries=retries, header=header)
        self._http = httpx.AsyncClient(**self.core.http_options())

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the API -------------------------------------------------------------------------------------------
    async def generate(self, prompt: str, *, on_event: OnEvent = None, idempotency_key: Optional[str] = None,
                       **params: Any) -> Result:
        """Submit a job and wait for its end; `on_event` sees each event. JobFailed if it fails."""
        task_id = await self.submit(prompt=prompt, idempotency_key=idempotency_key, **params)
        return self.core.result(await self.wait(task_id, on_event=on_event), self)

    async def submit(self, *, idempotency_key: Optional[str] = None, **params: Any) -> str:
        return (await self._json(self.core.submit(params, idempotency_key)))["task_id"]

    async def status(self, task_id: str, wait: float = 0) -> Dict[str, Any]:
        return await self._json(self.core.status(task_id, wait))

    async def cancel(self, task_id: str) -> Dict[str, Any]:
        return await self._json(self.core.cancel(task_id))

    async def models(self) -> Dict[str, Any]:
        return await self._json(self.core.models())

    async def loras(self) -> List[Dict[str, Any]]:
        return (await self._json(self.core.loras()))["loras"]

    async def delete_lora(self, name: str) -> None:
        await self._send(self.core.delete_lora(name))

    async def tasks(self, status: Optional[str] = None, limit: int = 20, offset: int = 0) -> Dict[str, Any]:
        return await self._json(self.core.tasks(status, limit, offset))

    async def queue(self) -> List[Dict[str, Any]]:
        found: List[Dict[str, Any]] = []
        for status in QUEUE_STATUSES:
            offset = 0
            while True:
                page = await self.tasks(status=status, limit=PAGE, offset=offset)
                found += page["tasks"]
                offset += len(page["tasks"])
                if not page["tasks"] or offset >= page["total"]:
                    break
        return queue_order(found)

    async def download(self, url: str) -> bytes:
        return (await self._send(self.core.download(url))).content

    # -- datasets and training -----------------------------------------------------------------------------
    async def create_dataset(self, name: str, files: DatasetFiles, *, captions: Optional[Mapping[str, str]] = None,
                             params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Create a dataset, PUT each file to its presigned URL, enable it (Client.create_dataset)."""
        sources = collect_files(files)
        created = await self._json(self.core.create_dataset(name, dataset_entries(sources, captions), params))
        try:
            for file_name, url in upload_urls(created):
                await self._send(self.core.upload(url, read_source(sources[file_name])))
            return await self._json(self.core.enable_dataset(name))
        except (SdqError, OSError):
            await self._forget_dataset(name)
            raise

    async def _forget_dataset(self, name: str) -> None:
        try:
            await self.delete_dataset(name)
        except SdqError:
            pass

    async def datasets(self) -> List[Dict[str, Any]]:
        return (await self._json(self.core.datasets()))["datasets"]

    async def dataset(self, name: str) -> Dict[str, Any]:
        return await self._json(self.core.dataset(name))

    async def delete_dataset(self, name: str) -> None:
        await self._send(self.core.delete_dataset(name))

    async def train(self, dataset: str, *, on_event: OnEvent = None, **params: Any) -> Dict[str, Any]:
        """Train a LoRA and wait for it; the training body (Client.train). JobFailed if it fails or is cancelled."""
        training_id = await self.start_training(dataset, **params)
        self.core.trained(await self.wait(training_id, on_event=on_event))
        return await self.training(training_id)

    async def start_training(self, dataset: str, *, idempotency_key: Optional[str] = None, **params: Any) -> str:
        return (await self._json(self.core.start_training(dataset, params, idempotency_key)))["id"]

    async def training(self, training_id: str) -> Dict[str, Any]:
        return await self._json(self.core.training(training_id))

    async def trainings(self, limit: int = 20, offset: int = 0) -> Dict[str, Any]:
        return await self._json(self.core.trainings(limit, offset))

    async def cancel_training(self, training_id: str) -> Dict[str, Any]:
        return await self._json(self.core.cancel_training(training_id))

    async def wait(self, task_id: str, on_event: OnEvent = None) -> Dict[str, Any]:
        """The task once it ended: from its event stream, or by long polling where there is none."""
        events = self.stream(task_id)
        try:
            async for event in events:
                if on_event:
                    on_event(event)
                if event.final:
                    return event.data if isinstance(event.data, dict) else await self.status(task_id)
        except (NotFound, MethodNotAllowed, Unavailable, ConnectionProblem):
            pass                  # no events route (an older server), no stream slot, or a stream that broke
        finally:
            await events.aclose()  # closes the connection now, not when the loop finalizes the generator
        return await self.poll(task_id, on_event)

    async def poll(self, task_id: str, on_event: OnEvent = None) -> Dict[str, Any]:
        while True:
            task = await self.status(task_id, wait=LONG_POLL_SECONDS)
            if is_final(task):
                if on_event:
                    on_event(Event(task["status"], None, task))
                return task

    async def stream(self, task_id: str, last_event_id: Optional[str] = None) -> AsyncIterator[Event]:
        """The task's events until its final one; a dropped connection resumes after the last event id.

        Resuming after the final event itself (the server answers 204) yields nothing.
        """
        parser = EventParser(last_event_id)
        drops = 0                 # connections in a row that ended before any event
        while True:
            response = await self._send(self.core.events(task_id, parser.last_event_id), stream=True)
            if response.status_code == NO_MORE_EVENTS:
                await response.aclose()
                return            # the id we resumed after was the task's final event
            got_event = False
            try:
                async for line in response.aiter_lines():
                    for event in parser.feed(line):
                        got_event = True
                        yield event
                        if event.final:
                            return
            except httpx.TransportError:
                pass              # dropped mid-stream: resume below
            finally:
                await response.aclose()
            drops = 0 if got_event else drops + 1
            if self.core.stream_gave_up(drops):
                raise StreamBroken(f"the events stream of task {task_id} broke {drops} times without an event")
            await asyncio.sleep(self.core.reconnect_delay(parser, drops))

    # -- sending -------------------------------------------------------------------------------------------
    async def _json(self, call: Call) -> Any:
        return (await self._send(call)).json()

    async def _send(self, call: Call, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            request = self.core.build(self._http, call)
            try:
                outcome: Any = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                outcome = exc
            delay = self.core.policy.delay(attempt, outcome, call.replayable)
            if delay is None:
                break
            if isinstance(outcome, httpx.Response):
                await outcome.aclose()
            log_retry(request, outcome, delay, attempt)
            await asyncio.sleep(delay)
            attempt += 1
        if isinstance(outcome, httpx.TransportError):
            raise self.core.unreachable(request, outcome) from outcome
        if outcome.is_error and stream:
            await outcome.aread()
        return self.core.check(outcome)
