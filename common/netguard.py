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
    if _allowed_by_name(host, allow):
        return None
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return f"host {host!r} does not resolve"
    for *_, sockaddr in infos:
        if reason := address_reason(host, sockaddr[0], allow):
            return reason
    return None


def address_reason(host: str, address: str, allow: Iterable[str] = ()) -> str | None:
    """Why connecting to `address` for `host` is refused (a non-public address not allowed), else None.

    Also the check of the address a connection actually reached, since DNS
    may answer differently between the check and the connect.
    """
    if _allowed_by_name(host, allow):
        return None
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.is_global or any(net is not None and ip in net for net in map(_network, allow)):
        return None
    return f"host {host!r} is or resolves to a non-public address"


def _allowed_by_name(host: str, allow: Iterable[str]) -> bool:
    return host.lower() in {a.lower() for a in allow}


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None   # a host name, matched by name
