"""Refuse outgoing requests to private networks (SSRF guard for webhooks and model downloads).

Why: a client-supplied callback URL is POSTed from inside the deployment,
where Redis, MinIO and cloud metadata endpoints live. Unless the operator
allows it (`callbacks.allow_private`), only public addresses are reachable.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Iterable
from urllib.parse import urlsplit


def blocked_reason(url: str, allow: Iterable[str] = ()) -> str | None:
    """Why `url` must not be called (its host is or resolves to a non-public address), else None.

    `allow`: host names or CIDR ranges the operator trusts although private.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return f"scheme {parts.scheme!r} is not http or https"
    host = parts.hostname
    if not host:
        return "URL has no host"
    allowed_nets = [_network(a) for a in allow]
    if host.lower() in {a.lower() for a in allow}:
        return None
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return f"host {host!r} does not resolve"
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not address.is_global and not any(net is not None and address in net for net in allowed_nets):
            return f"host {host!r} is or resolves to a non-public address"
    return None


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None   # a host name, matched by name
