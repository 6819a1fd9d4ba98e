"""Refuse outgoing requests to private networks (SSRF guard for webhooks).

Why: a client-supplied callback URL is POSTed from inside the deployment,
where Redis, MinIO and cloud metadata endpoints live. Unless the operator
allows it (`callbacks.allow_private`), only public addresses are reachable.
"""
from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


def blocked_reason(url: str) -> str | None:
    """Why `url` must not be called (its host is or resolves to a non-public address), else None."""
    host = urlsplit(url).hostname
    if not host:
        return "URL has no host"
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return f"host {host!r} does not resolve"
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not address.is_global:
            return f"host {host!r} resolves to a non-public address ({address})"
    return None
