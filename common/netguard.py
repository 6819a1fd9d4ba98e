"""What outgoing requests to client-given URLs may reach: the SSRF guard's rules.

Why: webhooks, SD on EKS image links and /upload_checkpoint model URLs are
fetched from inside the deployment, where Redis, S3 and the cloud metadata
address (169.254.169.254) live. Only public addresses are reachable unless
the operator allows more (`callbacks.allow_private`, `callbacks.allow_hosts`,
`downloads.allow_hosts`: host names or CIDR ranges).

The rules protect where the socket is opened (common/egress.py): the name is
resolved once, every address is judged here, and only a judged address is
connected to, so DNS cannot answer one address to the check and another to
the connect. `Guard.blocked_reason` applies the same rules early (at
submission) for a clearer error; on its own it protects nothing.

URLs are read by urllib3's `parse_url`, the parser requests fetches with, and
ambiguous ones (a backslash, user info before `@`) are refused, since other
parsers (`urllib.parse`) disagree with it about which host they name.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, Iterable

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url
from urllib3.util.connection import allowed_gai_family

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
AddrInfo = tuple[Any, Any, Any, str, tuple]   # one socket.getaddrinfo entry

SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
# Not public although Python's `is_global` may say so (its tables lag the IANA registries):
NOT_PUBLIC: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "64:ff9b:1::/48",   # local-use NAT64 (RFC 8215): translates into the operator's own IPv4 networks
    "2001::/23",        # IETF protocol assignments, Teredo (2001::/32) among them
    "fec0::/10",        # deprecated site-local
    "5f00::/16",        # SRv6 segment identifiers
    "3fff::/20",        # documentation
    "192.88.99.0/24",   # 6to4 relay anycast
))
NAT64 = ipaddress.ip_network("64:ff9b::/96")             # well-known NAT64 prefix: the last 32 bits are IPv4
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")          # deprecated ::a.b.c.d


class Refused(Exception):
    """The URL, or an address its host resolves to, may not be reached; str() says why (shown to clients)."""


@dataclass(frozen=True)
class Target:
    """Where a URL points, as urllib3 (hence requests) reads it."""

    scheme: str
    host: str   # lower case, without brackets or a trailing dot: the name that is resolved
    port: int


def parse_target(url: str) -> Target:
    """`url`'s scheme, host and port; Refused when it is not plain http(s) or could be read two ways."""
    if "\\" in url:
        raise Refused("the URL contains a backslash (URL parsers disagree on where its host ends)")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise Refused("the URL contains whitespace or control characters")
    try:
        parts = parse_url(url)
    except LocationParseError as exc:
        raise Refused(f"not a valid URL ({exc})") from exc
    scheme = (parts.scheme or "").lower()
    if scheme not in SCHEMES:
        raise Refused(f"scheme {parts.scheme!r} is not http or https")
    if parts.auth is not None:
        raise Refused("user info before '@' is not accepted (it hides which host is called)")
    host = plain_host(parts.host or "")
    if not host:
        raise Refused("URL has no host")
    return Target(scheme, host, parts.port or DEFAULT_PORTS[scheme])


def plain_host(host: str) -> str:
    """`[::1]` -> `::1`, `Example.COM.` -> `example.com`: one spelling to resolve and to match the allow-list."""
    return host.strip("[]").rstrip(".").lower()


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo).

    Why: traffic to such an address ends at the IPv4 address inside it, so
    `::ffff:127.0.0.1` or `64:ff9b::a9fe:a9fe` must be judged as that address.
    """
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip in IPV4_COMPATIBLE or ip in NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)   # (server, client); the client already de-obfuscated
    return found


def is_public(ip: IPAddress) -> bool:
    """Globally routable unicast, outside NOT_PUBLIC."""
    return ip.is_global and not ip.is_multicast and not any(ip in net for net in NOT_PUBLIC)


@dataclass(frozen=True)
class Guard:
    """What outgoing requests may reach: public addresses, plus what the operator allows.

    `names`: hosts trusted whatever they resolve to; `networks`: ranges trusted
    although not public; `everything`: the address check is off
    (callbacks.allow_private), URLs are still read strictly; `setting`: what
    the operator changes to allow more (named in refusals).
    """

    names: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()
    everything: bool = False
    setting: str = ""

    def address_reason(self, host: str, address: str) -> str | None:
        """Why connecting to `address` for `host` is refused (a non-public address not allowed), else None."""
        if self.everything or plain_host(host) in self.names:
            return None
        ip = ipaddress.ip_address(address.split("%")[0])
        forms = [*embedded_ipv4(ip), ip]   # the IPv4 inside first: the clearer reason
        if any(form in net for form in forms for net in self.networks):
            return None
        bad = next((form for form in forms if not is_public(form)), None)
        if bad is None:
            return None
        inside = "" if bad == ip else f" (which carries the IPv4 address {bad})"
        hint = f" (see {self.setting})" if self.setting else ""
        return f"host {host!r} is or resolves to {ip}{inside}, a non-public address{hint}"

    def checked_addresses(self, host: str, port: int) -> list[AddrInfo]:
        """Resolve `host` once; every address it gives must pass, else Refused (socket.gaierror if none).

        The one resolution a connection may use: connecting to anything but
        these entries would reopen the DNS rebinding window.
        """
        infos = [info for info in socket.getaddrinfo(host, port, allowed_gai_family(), socket.SOCK_STREAM)
                 if info[0] in (socket.AF_INET, socket.AF_INET6)]
        if not infos:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} has no IPv4 or IPv6 address")
        for info in infos:
            if reason := self.address_reason(host, info[4][0]):
                raise Refused(reason)
        return infos

    def blocked_reason(self, url: str) -> str | None:
        """Why `url` must not be called (ambiguous, not http(s), or its host is or resolves to a refused address).

        An early, clearer error (at submission); the connection checks again
        (common/egress.py), since DNS may answer differently by then.
        """
        try:
            target = parse_target(url)
            if not self.everything and target.host not in self.names:
                self.checked_addresses(target.host, target.port)
        except Refused as exc:
            return str(exc)
        except (socket.gaierror, UnicodeError):
            return f"host {target.host!r} does not resolve"
        return None


def guard_of(allow: Iterable[str], everything: bool = False, setting: str = "") -> Guard:
    """A Guard from an operator's allow-list: each entry a CIDR range (an address: its /32 or /128) or a host name."""
    names, networks = set(), []
    for entry in map(str, allow):
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            names.add(plain_host(entry.strip()))
    return Guard(frozenset(names), tuple(networks), everything, setting)


def callback_guard(settings: Any) -> Guard:
    """Webhooks: callbacks.allow_hosts, or everything with callbacks.allow_private."""
    return guard_of(settings.callbacks.allow_hosts, settings.callbacks.allow_private,
                    "callbacks.allow_hosts, callbacks.allow_private")


def download_guard(settings: Any) -> Guard:
    """Model downloads and image links: downloads.allow_hosts."""
    return guard_of(settings.downloads.allow_hosts, setting="downloads.allow_hosts")
