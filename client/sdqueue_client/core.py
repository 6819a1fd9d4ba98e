"""What the sync and async clients share: request building, response parsing, results.

Why a separate module: Client and AsyncClient differ only in `await`; every
URL, header, timeout, status check and parsed shape is decided here once, so
the two can never disagree about the API.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import quote

import httpx

from sdqueue_client import __version__
from sdqueue_client.errors import ConnectionProblem, JobFailed, error_for
from sdqueue_client.events import FINAL_EVENTS, EventParser
from sdqueue_client.files import dataset_files
from sdqueue_client.retry import BASE_DELAY, DEFAULT_RETRIES, MAX_DELAY, RetryPolicy, describe

DEFAULT_URL = "http://localhost:8000"
DEFAULT_TIMEOUT = 30.0        # seconds for connect, write and an ordinary read
LONG_POLL_SECONDS = 30        # ?wait= of the fallback: under api.max_wait_seconds (60) and common proxy timeouts
STREAM_READ_TIMEOUT = 45.0    # the server sends a keep-alive comment every 15 s; three missed ones = dead
IDEMPOTENCY_HEADER = "Idempotency-Key"
NO_MORE_EVENTS = 204          # the events route's answer to a Last-Event-ID that was the final event
API = "/api/v1"


@dataclass(frozen=True)
class Call:
    """One API request as data: built once, sent as many times as the retry policy allows."""

    method: str
    url: str
    params: Optional[Dict[str, Any]] = None
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    read_timeout: Optional[float] = None
    auth: bool = True             # False for presigned URLs: the key never goes to the object store
    content: Optional[bytes] = None   # a raw body (a dataset file PUT to S3) instead of `json`
    replayable: bool = True       # False: the server would make a second one (retry.RetryPolicy.delay)


@dataclass
class Result:
    """A finished task: the `task` body, its image `urls` and `seeds`; `download(i)` fetches image i.

    `download` returns bytes from a Client and an awaitable of bytes from an AsyncClient.
    """

    task: Dict[str, Any]
    client: Any = field(repr=False, default=None)

    @property
    def task_id(self) -> str:
        return self.task["task_id"]

    @property
    def urls(self) -> List[str]:
        return image_urls(self.task)

    @property
    def seeds(self) -> List[int]:
        return list(self.task.get("seeds") or [])

    def download(self, index: int = 0) -> Any:
        return self.client.download(self.urls[index])


class Core:
    """The API as calls and parsers, without any I/O."""

    def __init__(self, url: str = DEFAULT_URL, key: Optional[str] = None, *, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, header: str = "X-API-Key"):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.policy = RetryPolicy(retries=retries)
        self.auth = auth_headers(key, header)

    def http_options(self) -> Dict[str, Any]:
        """Keyword arguments for httpx.Client / httpx.AsyncClient."""
        return {"base_url": self.url, "timeout": httpx.Timeout(self.timeout),
                "headers": {"User-Agent": f"sdqueue-client/{__version__}"}}

    def build(self, http: Any, call: Call) -> httpx.Request:
        headers = {**(self.auth if call.auth else {}), **call.headers}
        timeout = httpx.Timeout(self.timeout, read=call.read_timeout or self.timeout)
        return http.build_request(call.method, call.url, params=call.params, json=call.json, content=call.content,
                                  headers=headers, timeout=timeout)

    # -- calls ---------------------------------------------------------------------------------------------
    def submit(self, params: Dict[str, Any], idempotency_key: Optional[str] = None) -> Call:
        """POST /generate with an Idempotency-Key, so every retry of this Call names the same submission."""
        body = {k: v for k, v in params.items() if v is not None}
        return Call("POST", f"{API}/generate", json=body,
                    headers={IDEMPOTENCY_HEADER: idempotency_key or str(uuid.uuid4())})

    def status(self, task_id: str, wait: float = 0) -> Call:
        params = {"wait": wait} if wait else None
        return Call("GET", task_path(task_id), params=params, read_timeout=(wait + self.timeout) if wait else None)

    def cancel(self, task_id: str) -> Call:
        return Call("DELETE", task_path(task_id))

    def models(self) -> Call:
        return Call("GET", f"{API}/models")

    def loras(self) -> Call:
        return Call("GET", f"{API}/loras")

    def delete_lora(self, name: str) -> Call:
        return Call("DELETE", f"{API}/loras/{quote(name, safe='')}")

    def tasks(self, status: Optional[str], limit: int, offset: int) -> Call:
        params = {"limit": limit, "offset": offset, **({"status": status} if status else {})}
        return Call("GET", f"{API}/tasks", params=params)

    def events(self, task_id: str, last_event_id: Optional[str]) -> Call:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        return Call("GET", task_path(task_id) + "/events", headers=headers,
                    read_timeout=max(self.timeout, STREAM_READ_TIMEOUT))

    def download(self, url: str) -> Call:
        return Call("GET", url, auth=False)

    # -- datasets and trainings ----------------------------------------------------------------------------
    def create_dataset(self, name: str, entries: List[Dict[str, Any]], params: Optional[Dict[str, Any]]) -> Call:
        """POST /datasets: not replayable, a repeat of one that got through is a 409 for the name it took."""
        return Call("POST", f"{API}/datasets", json={"name": name, "files": entries, "params": params or {}},
                    replayable=False)

    def upload(self, url: str, data: bytes) -> Call:
        """PUT one dataset file to its presigned URL (S3 itself: no API key; a PUT of the same bytes is idempotent)."""
        return Call("PUT", url, content=data, auth=False)

    def enable_dataset(self, name: str) -> Call:
        return Call("POST", dataset_path(name) + "/enable")

    def dataset(self, name: str) -> Call:
        return Call("GET", dataset_path(name))

    def datasets(self) -> Call:
        return Call("GET", f"{API}/datasets")

    def delete_dataset(self, name: str) -> Call:
        return Call("DELETE", dataset_path(name))

    def start_training(self, dataset: str, params: Dict[str, Any], idempotency_key: Optional[str] = None) -> Call:
        """POST /trainings with an Idempotency-Key, so a retry after a lost answer gets the first job back."""
        body = {"dataset": dataset, **{k: v for k, v in params.items() if v is not None}}
        return Call("POST", f"{API}/trainings", json=body,
                    headers={IDEMPOTENCY_HEADER: idempotency_key or str(uuid.uuid4())})

    def training(self, training_id: str) -> Call:
        return Call("GET", training_path(training_id))

    def trainings(self, limit: int, offset: int) -> Call:
        return Call("GET", f"{API}/trainings", params={"limit": limit, "offset": offset})

    def cancel_training(self, training_id: str) -> Call:
        return Call("DELETE", training_path(training_id))

    # -- answers -------------------------------------------------------------------------------------------
    @staticmethod
    def check(response: httpx.Response) -> httpx.Response:
        """The response itself when it succeeded; its ApiError otherwise (the body must have been read)."""
        if response.is_error:
            raise error_for(response)
        return response

    @staticmethod
    def unreachable(request: httpx.Request, error: httpx.TransportError) -> ConnectionProblem:
        base = f"{request.url.scheme}://{request.url.netloc.decode()}"
        return ConnectionProblem(f"cannot reach {base}: {describe(error)}")

    def result(self, task: Dict[str, Any], client: Any) -> Result:
        """A completed task as a Result; a failed or cancelled one raises JobFailed."""
        if task.get("status") != "completed":
            raise JobFailed(task)
        return Result(task, client)

    @staticmethod
    def trained(task: Dict[str, Any]) -> None:
        """Nothing when the training task completed; JobFailed (with the task's reason) when it failed or was
        cancelled."""
        if task.get("status") != "completed":
            raise JobFailed(task)

    def reconnect_delay(self, parser: EventParser, drops: int) -> float:
        """The server's `retry:` (else our base delay), doubled for each drop in a row without an event."""
        base = parser.retry_ms / 1000 if parser.retry_ms is not None else BASE_DELAY
        return min(MAX_DELAY, base * 2 ** max(0, drops - 1))

    def stream_gave_up(self, drops: int) -> bool:
        return drops > self.policy.retries


def auth_headers(key: Optional[str], header: str) -> Dict[str, str]:
    """The key in the configured header; `Authorization` gets the Bearer form the service also accepts."""
    if not key:
        return {}
    if header.lower() == "authorization":
        return {"Authorization": f"Bearer {key}"}
    return {header: key}


def task_path(task_id: str) -> str:
    return f"{API}/tasks/{quote(task_id, safe='')}"


def dataset_path(name: str) -> str:
    return f"{API}/datasets/{quote(name, safe='')}"


def training_path(training_id: str) -> str:
    return f"{API}/trainings/{quote(training_id, safe='')}"


Source = Union[bytes, bytearray, memoryview, str, os.PathLike]
DatasetFiles = Union[Mapping[str, Source], str, os.PathLike]


def collect_files(files: DatasetFiles) -> Dict[str, Source]:
    """File name -> source: the mapping as given, or a folder's images and their captions (files.dataset_files)."""
    if isinstance(files, (str, os.PathLike)):
        found: Dict[str, Source] = dict(dataset_files(Path(files)))
        if not found:
            raise ValueError(f"no images (png, jpg, jpeg, webp) in {files}")
        return found
    return dict(files)


def dataset_entries(files: Mapping[str, Source], captions: Optional[Mapping[str, str]] = None
                    ) -> List[Dict[str, Any]]:
    """The `files` of POST /datasets: each file's name, an image's caption from `captions` when given.

    ValueError for a caption of an image that is not among the files: it would be dropped without a word.
    """
    captions = dict(captions or {})
    stray = sorted(set(captions) - set(files))
    if stray:
        raise ValueError(f"captions for files not in the dataset: {', '.join(stray)}")
    return [{"name": name, **({"caption": captions[name]} if name in captions else {})} for name in files]


def read_source(source: Source) -> bytes:
    """A file's bytes: given as bytes, or read from its path."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    return Path(source).read_bytes()


def upload_urls(created: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(file name, presigned PUT URL) of each file of a just created dataset."""
    return [(item["name"], item["upload_url"]) for item in created.get("files", [])]


def image_urls(task: Dict[str, Any]) -> List[str]:
    """`result_urls` for several images, `result_url` for one, nothing before the task completed."""
    if task.get("result_urls"):
        return list(task["result_urls"])
    return [task["result_url"]] if task.get("result_url") else []


def is_final(task: Dict[str, Any]) -> bool:
    return task.get("status") in FINAL_EVENTS


def queue_order(tasks: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Running tasks first, then waiting ones by their place in the queue."""
    return sorted(tasks, key=lambda t: (t.get("status") != "processing", t.get("queue_position") or 0))


QUEUE_STATUSES = ("processing", "pending")
PAGE = 100                    # the API's largest page
