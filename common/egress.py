"""The one HTTP client for client-given URLs (webhooks, image links, model downloads): resolver-pinned.

Why its own connection class: checking a URL's host and then letting
requests connect resolves the name twice, and a hostile DNS server can
answer a public address to the check and 127.0.0.1 to the connect (DNS
rebinding). Here the connection itself resolves the name once, has every
address judged (common/netguard.py) and connects only to a judged one; the
Host header, TLS SNI and the certificate check still use the name. Every
request of the session, each redirect hop included, is read by netguard's
parser and connects this way, so nothing is sent to or read from a peer that
was not checked.

Proxies and other settings from the environment (HTTP(S)_PROXY, .netrc,
REQUESTS_CA_BUNDLE) are not used: a proxy would resolve the name again,
outside the check, and .netrc credentials must not go to client-given hosts.
"""
from __future__ import annotations

import socket
import sys
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from common.netguard import AddrInfo, Guard, Refused, parse_target


def open_socket(info: AddrInfo, timeout: Any, source_address: tuple[str, int] | None,
                socket_options: list | None) -> socket.socket:
    """A socket connected to one resolved address (as urllib3's create_connection does, without resolving)."""
    family, kind, proto, _, sockaddr = info
    sock = socket.socket(family, kind, proto)
    try:
        for option in socket_options or ():
            sock.setsockopt(*option)
        if timeout is None or isinstance(timeout, (int, float)):   # else urllib3's 'default' sentinel
            sock.settimeout(timeout)
        if source_address:
            sock.bind(source_address)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_first(infos: list[AddrInfo], timeout: Any, source_address: tuple[str, int] | None,
                  socket_options: list | None) -> socket.socket:
    """The first of the checked addresses that accepts a connection (in resolver order, like urllib3)."""
    error: OSError | None = None
    for info in infos:
        try:
            return open_socket(info, timeout, source_address, socket_options)
        except OSError as exc:
            error = exc
    raise error or OSError("no address to connect to")


class PinnedConnect:
    """Mixin for urllib3 connections: resolve once, check every address, connect to a checked one.

    `self.host` stays the name, so the Host header, SNI and the certificate
    match are the name's, not the address's.
    """

    guard: Guard

    def __init__(self, *args: Any, guard: Guard, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.guard = guard

    def _new_conn(self) -> socket.socket:
        try:
            infos = self.guard.checked_addresses(self._dns_host, self.port)   # Refused propagates as is
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        try:
            sock = connect_first(infos, self.timeout, self.source_address, self.socket_options)
        except socket.timeout as exc:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out. "
                                            f"(connect timeout={self.timeout})") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock


class PinnedHTTPConnection(PinnedConnect, HTTPConnection):
    """Plain HTTP, pinned."""


class PinnedHTTPSConnection(PinnedConnect, HTTPSConnection):
    """HTTPS, pinned; TLS is set up by urllib3 on the checked socket with server_hostname = the name."""


class PinnedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = PinnedHTTPConnection


class PinnedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = PinnedHTTPSConnection


class PinnedPoolManager(PoolManager):
    """A PoolManager whose pools open only pinned connections, each judged by `guard`."""

    def __init__(self, guard: Guard, **kwargs: Any):
        super().__init__(**kwargs)
        self.guard = guard
        self.pool_classes_by_scheme = {"http": PinnedHTTPConnectionPool, "https": PinnedHTTPSConnectionPool}

    def _new_pool(self, scheme: str, host: str, port: int,
                  request_context: dict[str, Any] | None = None) -> HTTPConnectionPool:
        # After the pool key is made (the guard is no PoolKey field): the pool hands it to each connection.
        context = dict(self.connection_pool_kw if request_context is None else request_context, guard=self.guard)
        return super()._new_pool(scheme, host, port, context)


class PinnedAdapter(HTTPAdapter):
    """requests' transport for client-given URLs: strict URL reading, pinned connections, no proxy."""

    def __init__(self, guard: Guard, **kwargs: Any):
        self.guard = guard   # before super().__init__, which builds the pool manager
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        self._pool_connections, self._pool_maxsize, self._pool_block = connections, maxsize, block
        self.poolmanager = PinnedPoolManager(self.guard, num_pools=connections, maxsize=maxsize, block=block,
                                             **pool_kwargs)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        parse_target(request.url or "")   # Refused: the same rules for every request, redirect hops included
        kwargs["proxies"] = {}
        return super().send(request, **kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        raise Refused("client-given URLs are fetched directly, never through a proxy")


class PinnedSession(requests.Session):
    """A requests Session whose every request connects only to addresses its guard accepts.

    The URL a caller gives is read strictly before requests normalises it
    (which would quote a backslash into the path and hide it); callers pass
    allow_redirects=False and follow redirects themselves, each hop through
    this session again: requests' own following reads each redirect's body,
    which a hostile server can make endless.
    """

    def __init__(self, guard: Guard):
        super().__init__()
        self.trust_env = False
        adapter = PinnedAdapter(guard)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
        parse_target(str(request.url))
        return super().prepare_request(request)
