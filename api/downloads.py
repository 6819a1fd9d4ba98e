"""Model files and image links fetched from client-given URLs (POST /upload_checkpoint, SD on EKS image_link).

Every request goes through the resolver-pinned client (common/egress.py),
which refuses a non-public address before connecting. Redirects are followed
here, at most MAX_REDIRECTS, each hop through the same client (civitai
answers 307 to a CDN; a hostile server could answer 302 to Redis or the
cloud metadata address), without reading a redirect's body; the file name
comes from the final URL or Content-Disposition, and a size cap stops an
endless body.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable
from urllib.parse import unquote, urljoin, urlsplit

import requests

from common.egress import PinnedSession
from common.netguard import Refused, download_guard
from common.storage import Storage

MAX_REDIRECTS = 5
CHUNK = 1 << 20
DISPOSITION_NAME = re.compile(r"filename\*?=(?:UTF-8'')?\"?([^\";]+)\"?", re.IGNORECASE)


class DownloadRefused(Exception):
    """The URL may not or cannot be fetched; the message says why (shown to the client)."""


@dataclass
class Download:
    """An open response body and the file name it should be stored as."""

    name: str
    stream: BinaryIO
    response: requests.Response


class CappedStream:
    """A file-like view of a response body: at most `limit` bytes, finished by `deadline`.

    A dropped connection or a server trickling bytes becomes DownloadRefused,
    never an error page, and never holds an API thread for longer than downloads.timeout
    per read plus downloads.total_timeout overall.
    """

    def __init__(self, response: requests.Response, limit: int, deadline: float):
        self._chunks = response.iter_content(CHUNK)
        self._buffer = b""
        self.limit, self.read_bytes, self.deadline = limit, 0, deadline

    def _next_chunk(self) -> bytes:
        if time.monotonic() > self.deadline:
            raise DownloadRefused("the download took longer than downloads.total_timeout")
        try:
            return next(self._chunks, b"")
        except requests.RequestException as exc:
            raise DownloadRefused(f"the download broke off: {type(exc).__name__}") from exc

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = self._next_chunk()
            if not chunk:
                break
            self.read_bytes += len(chunk)
            if self.read_bytes > self.limit:
                raise DownloadRefused(f"file is larger than the {self.limit} bytes allowed")
            self._buffer += chunk
        if size < 0:
            out, self._buffer = self._buffer, b""
        else:
            out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out


def file_name(response: requests.Response) -> str:
    """Content-Disposition's filename, else the last path segment of the final URL."""
    match = DISPOSITION_NAME.search(response.headers.get("Content-Disposition", ""))
    name = match.group(1) if match else urlsplit(response.url).path.rsplit("/", 1)[-1]
    return unquote(name).strip().replace("/", "_")


def declared_length(response: requests.Response) -> int:
    """Content-Length if it is one plain number, else 0 (the stream cap still applies)."""
    value = response.headers.get("Content-Length", "").strip()
    return int(value) if value.isdigit() else 0


def open_download(url: str, settings: Any, limit: int | None = None) -> Download:
    """GET `url` following at most MAX_REDIRECTS redirects, each hop connected only to a checked address.

    `limit`: most bytes accepted (default downloads.max_bytes).
    """
    limit = settings.downloads.max_bytes if limit is None else limit
    session = PinnedSession(download_guard(settings))
    try:
        return follow(session, url, settings, limit)
    except BaseException:
        session.close()
        raise


def follow(session: PinnedSession, url: str, settings: Any, limit: int) -> Download:
    """The 200 answer at the end of at most MAX_REDIRECTS redirects; a redirect's body is never read."""
    for _ in range(MAX_REDIRECTS + 1):
        try:
            response = session.get(url, stream=True, allow_redirects=False, timeout=settings.downloads.timeout,
                                   headers={"User-Agent": "sdqueue-model-fetch"})
        except Refused as exc:
            raise DownloadRefused(f"{url}: {exc}") from exc
        except requests.RequestException as exc:
            raise DownloadRefused(f"{url}: {type(exc).__name__}: {exc}") from exc
        if response.is_redirect:
            url = urljoin(url, response.headers["Location"])
            response.close()
            continue
        if response.status_code != 200:
            response.close()
            raise DownloadRefused(f"{url}: the server answered HTTP {response.status_code}")
        declared = declared_length(response)
        if declared > limit:
            response.close()
            raise DownloadRefused(f"{url}: {declared} bytes is more than the {limit} allowed")
        deadline = time.monotonic() + settings.downloads.total_timeout
        return Download(file_name(response), CappedStream(response, limit, deadline), response)
    raise DownloadRefused(f"{url}: more than {MAX_REDIRECTS} redirects")


def fetch_link(link: str, settings: Any, storage: Storage, may_read: Callable[[dict[str, str]], bool]) -> bytes:
    """The bytes behind an http(s) URL (through open_download) or s3://{our bucket}/key, at most api.max_body_bytes.

    `may_read(metadata)`: whether the caller may read an object of the bucket
    (outputs carry their task id: another key's images do not exist for it).
    """
    limit = settings.api.max_body_bytes
    if link.startswith("s3://"):
        bucket, _, key = link[5:].partition("/")
        if bucket != storage.bucket or not key:
            raise DownloadRefused(f"{link}: only s3://{storage.bucket}/... objects can be read")
        found = storage.head(key)
        if found is None or not may_read(found[1]):
            raise DownloadRefused(f"{link}: no such object")
        if found[0] > limit:
            raise DownloadRefused(f"{link}: {found[0]} bytes is more than the {limit} allowed")
        return storage.get(key)
    download = open_download(link, settings, limit)
    with download.response:
        return download.stream.read()
