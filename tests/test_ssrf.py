"""The SSRF guard at connect time: one URL parser, every address judged, DNS resolved once per connection.

In-process: a real HTTP(S) server on 127.0.0.1 stands for both a private
service and an allowed host; a fake resolver (socket.getaddrinfo patched)
plays the DNS server that answers differently from one question to the next.
"""
from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from api.downloads import DownloadRefused, open_download
from common import egress
from common.egress import PinnedHTTPSConnection, PinnedSession
from common.netguard import Guard, Refused, embedded_ipv4, guard_of, parse_target
from common.settings import load_settings
from worker.webhook import deliver

ROOT = Path(__file__).resolve().parent.parent
PRIVATE_ELSEWHERE = "10.9.9.9"   # never connected to: refused before any connect, or the connect is faked
PUBLIC = "8.8.8.8"


class Server:
    """HTTP on 127.0.0.1 (HTTPS with `tls`): `/ok` answers 200, paths in `redirects` answer 302; records each hit."""

    def __init__(self, redirects: dict[str, str] | None = None, tls: ssl.SSLContext | None = None):
        self.hits: list[tuple[str, str, str]] = []   # (method, path, Host header)
        hits, moves = self.hits, redirects or {}

        class Handler(BaseHTTPRequestHandler):
            def answer(self):
                hits.append((self.command, self.path, self.headers.get("Host", "")))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path in moves:
                    self.send_response(302)
                    self.send_header("Location", moves[self.path].replace("PORT", str(server.port)))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200 if self.path == "/ok" else 404)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST = answer

            def log_message(self, *args):
                pass

        server = self
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeDNS:
    """socket.getaddrinfo for chosen names: successive answers (the last one repeats); other names resolve really."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.answers: dict[str, list[list[str]]] = {}
        self.asked: list[str] = []
        real = socket.getaddrinfo

        def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
            if host not in self.answers:
                return real(host, port, family, type, proto, flags)
            self.asked.append(host)
            queue = self.answers[host]
            ips = queue.pop(0) if len(queue) > 1 else queue[0]
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0)) if ":" in ip
                    else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    def answer(self, host: str, *answers: list[str]) -> None:
        self.answers[host] = list(answers)


@pytest.fixture
def server():
    srv = Server({"/to-private": "http://127.0.0.1:PORT/ok", "/to-allowed": "http://hub.test:PORT/ok",
                  "/to-backslash": "http://127.0.0.1\\@hub.test:PORT/ok", "/loop": "/loop"})
    yield srv
    srv.close()


@pytest.fixture
def dns(monkeypatch):
    return FakeDNS(monkeypatch)


def download_settings(*allow: str):
    return load_settings(ROOT / "config.example.yaml", env={},
                         overrides={"downloads.allow_hosts": list(allow), "downloads.timeout": 5.0})


# --- one URL parser --------------------------------------------------------------------------
@pytest.mark.parametrize("url, reason", [
    ("http://169.254.169.254\\@example.com/", "backslash"),   # urlsplit: example.com; requests: 169.254.169.254
    ("http://example.com\\@169.254.169.254/", "backslash"),
    ("http://example.com@169.254.169.254/", "user info"),
    ("http://a@b@c/", "user info"),
    ("http://user:pw@example.com/", "user info"),
    ("ftp://example.com/x", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("gopher://8.8.8.8/", "scheme"),
    ("http:///x", "no host"),
    ("http://:80/", "no host"),
    ("http://exa mple.com/", "whitespace"),
    ("http://example.com/\r\nX-Injected: 1", "control"),
])
def test_ambiguous_or_non_http_urls_are_refused_with_the_reason(url, reason):
    with pytest.raises(Refused, match=reason):
        parse_target(url)
    assert reason in Guard(everything=True).blocked_reason(url)   # even with the address check off


def test_the_parser_reads_hosts_as_requests_does():
    assert parse_target("HTTP://Example.COM./a").host == "example.com"
    assert parse_target("https://[::ffff:127.0.0.1]/").host == "::ffff:127.0.0.1"
    assert parse_target("http://exa%6dple.com:8080/").host == "example.com"
    assert (parse_target("https://x.example/").port, parse_target("http://x.example/").port) == (443, 80)
    assert urlsplit("http://169.254.169.254\\@example.com/").hostname == "example.com"   # why backslashes go
    assert requests.Request("GET", "http://169.254.169.254\\@example.com/").prepare().url.startswith(
        "http://169.254.169.254/")


# --- every address, embedded IPv4 included ----------------------------------------------------------
@pytest.mark.parametrize("address, inside", [
    ("::ffff:127.0.0.1", "127.0.0.1"),                            # IPv4-mapped
    ("::ffff:169.254.169.254", "169.254.169.254"),
    ("::127.0.0.1", "127.0.0.1"),                                 # IPv4-compatible (deprecated)
    ("::10.0.0.1", "10.0.0.1"),
    ("64:ff9b::127.0.0.1", "127.0.0.1"),                          # NAT64, well-known prefix
    ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
    ("2002:7f00:1::1", "127.0.0.1"),                              # 6to4
    ("2002:a9fe:a9fe::1", "169.254.169.254"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1"),        # Teredo (client 127.0.0.1, obfuscated)
])
def test_ipv6_forms_of_private_ipv4_are_refused(address, inside):
    import ipaddress

    assert ipaddress.ip_address(inside) in embedded_ipv4(ipaddress.ip_address(address))
    reason = Guard().address_reason("h.example", address)
    assert reason and "non-public" in reason, address


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.5", "169.254.169.254",
                                     "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "192.88.99.1",
                                     "::1", "::", "fe80::1", "fc00::1", "fec0::1", "ff02::1", "64:ff9b:1::a00:1",
                                     "2001::1", "2001:db8::1"])
def test_non_global_addresses_are_refused(address):
    assert Guard().address_reason("h.example", address)


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808",
                                     "2002:808:808::1"])
def test_public_addresses_and_their_ipv6_forms_pass(address):
    assert Guard().address_reason("h.example", address) is None


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/cb", "http://localhost/cb", "http://10.1.2.3/cb",
                                 "http://169.254.169.254/latest", "http://[::1]/cb", "http://192.168.1.5/cb",
                                 "http://[::ffff:169.254.169.254]/", "http://0x7f.1/", "http://2130706433/"])
def test_urls_of_private_hosts_are_refused_early(url):
    assert "non-public" in Guard().blocked_reason(url)


def test_allow_list_by_name_and_by_cidr():
    guard = guard_of(["models.internal", "10.0.0.0/8", "127.0.0.2", "fd00::/8"], setting="downloads.allow_hosts")
    assert guard.address_reason("models.internal", "192.168.7.7") is None    # by name: whatever it resolves to
    assert guard.address_reason("MODELS.internal.", "127.0.0.1") is None
    assert guard.address_reason("a.example", "10.1.2.3") is None              # by range
    assert guard.address_reason("a.example", "::ffff:10.1.2.3") is None       # the same address, mapped
    assert guard.address_reason("a.example", "127.0.0.2") is None             # an address is its /32
    assert guard.address_reason("a.example", "fd12::1") is None
    refused = guard.address_reason("a.example", "127.0.0.1")
    assert "127.0.0.1" in refused and "downloads.allow_hosts" in refused
    assert guard.blocked_reason("http://127.0.0.2:81/m.safetensors") is None
    assert guard.blocked_reason("http://10.0.0.7/m.safetensors") is None
    assert guard.blocked_reason("http://models.internal/m") is None           # not even resolved
    assert "non-public" in guard.blocked_reason("http://localhost/m")
    assert "does not resolve" in Guard().blocked_reason("http://no-such-host.invalid/cb")
    assert Guard().blocked_reason("http://8.8.8.8/cb") is None


def test_every_address_of_a_name_is_checked(dns):
    dns.answer("mixed.test", [PUBLIC, "127.0.0.1"])
    assert "127.0.0.1" in Guard().blocked_reason("http://mixed.test/")
    with pytest.raises(Refused, match="127.0.0.1"):
        Guard().checked_addresses("mixed.test", 80)


# --- the connection: resolved once, connected to a checked address ------------------------------------
def test_a_local_server_is_reachable_only_when_allowed(server, dns):
    url = f"http://127.0.0.1:{server.port}/ok"
    with pytest.raises(Refused, match="non-public"):
        PinnedSession(Guard()).get(url, timeout=5)
    assert server.hits == []
    for guard in (guard_of(["127.0.0.1"]), guard_of(["127.0.0.0/8"]), Guard(everything=True)):
        assert PinnedSession(guard).get(url, timeout=5).text == "ok"
    dns.answer("hub.test", ["127.0.0.1"])
    assert PinnedSession(guard_of(["hub.test"])).get(f"http://hub.test:{server.port}/ok", timeout=5).text == "ok"
    assert server.hits[-1] == ("GET", "/ok", f"hub.test:{server.port}")   # Host stays the name


def test_rebinding_after_the_check_is_refused_at_the_connect(server, dns):
    """The old flow: a check resolves (public), then the fetch resolves again (127.0.0.1)."""
    dns.answer("rebind.test", [PUBLIC], ["127.0.0.1"])
    url = f"http://rebind.test:{server.port}/ok"
    assert Guard().blocked_reason(url) is None        # the early check saw a public address
    with pytest.raises(Refused, match="127.0.0.1"):
        PinnedSession(Guard()).get(url, timeout=5)    # the connection's own resolution is what counts
    assert server.hits == []


def test_the_connection_uses_its_one_resolution_only(server, dns, monkeypatch):
    """Public first, 127.0.0.1 after: the client asks once and connects only to the address it checked."""
    dns.answer("rebind.test", [PUBLIC], ["127.0.0.1"])
    connected: list[tuple] = []

    def refuse_to_connect(info, *args):
        connected.append(info[4])
        raise ConnectionRefusedError("test: no network")

    monkeypatch.setattr(egress, "open_socket", refuse_to_connect)
    with pytest.raises(requests.ConnectionError):
        PinnedSession(Guard()).get(f"http://rebind.test:{server.port}/ok", timeout=5)
    assert connected == [(PUBLIC, server.port)] and dns.asked == ["rebind.test"]
    assert server.hits == []


def test_rebinding_the_other_way_reaches_only_the_checked_address(server, dns):
    """Allowed 127.0.0.1 first, a private address after: the request reaches 127.0.0.1, asked once."""
    dns.answer("flip.test", ["127.0.0.1"], [PRIVATE_ELSEWHERE])
    guard = guard_of(["127.0.0.1/32"])
    assert PinnedSession(guard).get(f"http://flip.test:{server.port}/ok", timeout=5).text == "ok"
    assert dns.asked == ["flip.test"]
    dns.answer("flop.test", [PRIVATE_ELSEWHERE], ["127.0.0.1"])
    with pytest.raises(Refused, match=PRIVATE_ELSEWHERE):
        PinnedSession(guard).get(f"http://flop.test:{server.port}/ok", timeout=5)


def test_environment_proxies_are_not_used(server, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")   # nothing listens there
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    url = f"http://127.0.0.1:{server.port}/ok"
    assert PinnedSession(guard_of(["127.0.0.1"])).get(url, timeout=5).text == "ok"


# --- redirects: every hop through the same client -------------------------------------------------
def test_a_redirect_to_a_private_address_is_refused(server, dns):
    dns.answer("hub.test", ["127.0.0.1"])
    settings = download_settings("hub.test")
    download = open_download(f"http://hub.test:{server.port}/to-allowed", settings)
    with download.response:
        assert download.stream.read() == b"ok"
    with pytest.raises(DownloadRefused, match="127.0.0.1.*non-public"):
        open_download(f"http://hub.test:{server.port}/to-private", settings)
    with pytest.raises(DownloadRefused, match="backslash"):
        open_download(f"http://hub.test:{server.port}/to-backslash", settings)
    with pytest.raises(DownloadRefused, match="more than 5 redirects"):
        open_download(f"http://hub.test:{server.port}/loop", settings)
    assert [path for _, path, host in server.hits if host.startswith("127.0.0.1")] == []   # never reached by address
    with pytest.raises(DownloadRefused, match="backslash"):
        open_download("http://169.254.169.254\\@example.com/", settings)


def test_webhooks_connect_through_the_guard_and_follow_no_redirect(server, dns):
    payload = {"task_id": "t-1", "status": "completed"}
    url = f"http://127.0.0.1:{server.port}/ok"
    with pytest.raises(Refused, match="non-public"):
        deliver(url, payload, "s", 5, 1, guard_of([]))
    assert server.hits == []
    assert deliver(url, payload, "s", 5, 1, guard_of([], everything=True)) == 200
    assert deliver(f"http://127.0.0.1:{server.port}/to-private", payload, "", 5, 1, guard_of(["127.0.0.1"])) == 302
    assert [hit[:2] for hit in server.hits] == [("POST", "/ok"), ("POST", "/to-private")]
    dns.answer("hook.test", [PUBLIC], ["127.0.0.1"])
    hook = f"http://hook.test:{server.port}/ok"
    assert Guard().blocked_reason(hook) is None   # the worker's early check passes
    with pytest.raises(Refused, match="127.0.0.1"):
        deliver(hook, payload, "", 5, 1, Guard())
    assert len(server.hits) == 2


# --- HTTPS: the name, not the address, for SNI and the certificate ---------------------------------
def test_https_connections_keep_the_name_for_sni_and_verification():
    guard = guard_of(["127.0.0.1"])
    pool = PinnedSession(guard).get_adapter("https://models.test/").poolmanager.connection_from_url(
        "https://models.test:8443/")
    conn = pool._new_conn()
    assert isinstance(conn, PinnedHTTPSConnection) and conn.guard is guard
    # None for both: urllib3 sends `host` (the name) as SNI and matches the certificate against it
    assert conn.host == "models.test" and conn.server_hostname is None and conn.assert_hostname is None


@pytest.fixture
def tls_files(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=models.test",
                    "-addext", "subjectAltName=DNS:models.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_https_verifies_the_certificate_of_the_name(tls_files, dns):
    cert, key = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    srv = Server(tls=context)
    try:
        dns.answer("models.test", ["127.0.0.1"])
        session = PinnedSession(guard_of(["127.0.0.1"]))
        assert session.get(f"https://models.test:{srv.port}/ok", verify=str(cert), timeout=5).text == "ok"
        assert names == ["models.test"] and srv.hits == [("GET", "/ok", f"models.test:{srv.port}")]
        with pytest.raises(requests.exceptions.SSLError):   # the certificate names models.test, not the address
            session.get(f"https://127.0.0.1:{srv.port}/ok", verify=str(cert), timeout=5)
        dns.answer("other.test", ["127.0.0.1"])
        with pytest.raises(requests.exceptions.SSLError):
            session.get(f"https://other.test:{srv.port}/ok", verify=str(cert), timeout=5)
        assert len(srv.hits) == 1
    finally:
        srv.close()
