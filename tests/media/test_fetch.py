"""UrlFetcher against real loopback servers: SSRF policy, redirects, limits, timeouts, TLS."""

from __future__ import annotations

import datetime
import gzip
import hashlib
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qwenserve.errors import InvalidInput, InvalidRequest, UpstreamError, UpstreamTimeout
from qwenserve.media.fetch import UrlFetcher, is_public_address
from tests.media.loopback import (
    LoopbackServer,
    body_route,
    chunked_route,
    drip_route,
    header_drip_route,
    redirect_route,
    send,
    sleep_route,
)

# --- the address policy --------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "2002:7f00:1::1",  # 6to4 wrapping 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 wrapping 169.254.169.254
    ],
)
def test_policy_refuses_non_public_addresses(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_policy_accepts_public_addresses(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


# --- refusals before any connection --------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "[::1]", "0.0.0.0", "2130706433", "127.1"],
)
def test_loopback_refused_by_default(server: LoopbackServer, host: str) -> None:
    server.routes["/img"] = body_route(b"secret")
    with pytest.raises(InvalidRequest) as info:
        UrlFetcher().fetch(server.url("/img", host=host), field="image_1")
    assert info.value.field == "image_1"
    assert str(info.value).startswith("image_1: ")
    assert "private" in str(info.value)
    assert server.total_hits == 0


@pytest.mark.parametrize(
    "url", ["http://169.254.169.254/latest/meta-data/", "http://10.20.30.40/x", "http://[fe80::1]/"]
)
def test_private_and_link_local_refused(url: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        UrlFetcher().fetch(url, field="image")
    assert info.value.field == "image"


def test_refusal_message_does_not_reveal_resolved_address(server: LoopbackServer) -> None:
    with pytest.raises(InvalidRequest) as info:
        UrlFetcher().fetch(server.url("/", host="localhost"), field="image")
    assert "127.0.0.1" not in str(info.value)
    assert "localhost" in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/a.png",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "http://user:secret@example.com/a.png",
        "http:///nohost",
    ],
)
def test_only_plain_http_urls_accepted(url: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        UrlFetcher(allow_private=True).fetch(url, field="image")
    assert info.value.field == "image"


def test_unresolvable_host_is_upstream_error() -> None:
    with pytest.raises(UpstreamError):
        UrlFetcher().fetch("http://no-such-host.invalid/x.png", field="image")


# --- allowed fetches ----------------------------------------------------------------------


def test_allowed_with_allow_private_and_host_header_kept(server: LoopbackServer) -> None:
    def echo_host(h: Any) -> None:
        send(h, 200, h.headers["Host"].encode())

    server.routes["/host"] = echo_host
    fetcher = UrlFetcher(allow_private=True)
    assert fetcher.fetch(server.url("/host", host="localhost"), field="f") == (
        f"localhost:{server.port}".encode()
    )
    assert fetcher.fetch(server.url("/host", host="2130706433"), field="f") == (
        f"2130706433:{server.port}".encode()
    )


def test_fetch_to_file_streams_and_hashes(server: LoopbackServer, tmp_path: Path) -> None:
    body = bytes(range(256)) * 1000
    server.routes["/blob"] = body_route(body)
    dest = tmp_path / "blob.bin"
    digest = UrlFetcher(allow_private=True).fetch_to_file(server.url("/blob"), dest, field="f")
    assert digest == hashlib.sha256(body).hexdigest()
    assert dest.read_bytes() == body


def test_fetch_to_file_removes_partial_file(server: LoopbackServer, tmp_path: Path) -> None:
    server.routes["/big"] = chunked_route(3 * 65536)
    dest = tmp_path / "partial.bin"
    with pytest.raises(InvalidInput):
        UrlFetcher(allow_private=True).fetch_to_file(
            server.url("/big"), dest, field="f", max_bytes=65536
        )
    assert not dest.exists()


# --- redirects ----------------------------------------------------------------------------


def test_relative_redirect_followed(server: LoopbackServer) -> None:
    server.routes["/start"] = redirect_route("/final")
    server.routes["/final"] = body_route(b"done")
    assert UrlFetcher(allow_private=True).fetch(server.url("/start"), field="f") == b"done"


@pytest.mark.parametrize("location", ["ftp://example.com/x", "file:///etc/passwd"])
def test_redirect_to_other_scheme_refused(server: LoopbackServer, location: str) -> None:
    server.routes["/start"] = redirect_route(location)
    with pytest.raises(InvalidRequest) as info:
        UrlFetcher(allow_private=True).fetch(server.url("/start"), field="image_2")
    assert info.value.field == "image_2"
    assert "redirect" in str(info.value)


def test_redirect_loop_refused(server: LoopbackServer) -> None:
    server.routes["/a"] = redirect_route("/b")
    server.routes["/b"] = redirect_route("/a")
    with pytest.raises(InvalidRequest, match="redirected more than 5 times"):
        UrlFetcher(allow_private=True).fetch(server.url("/a"), field="f")
    assert server.total_hits == 6


def test_max_redirects_counts_hops(server: LoopbackServer) -> None:
    server.routes["/1"] = redirect_route("/2")
    server.routes["/2"] = redirect_route("/3")
    server.routes["/3"] = body_route(b"end")
    assert UrlFetcher(allow_private=True, max_redirects=2).fetch(server.url("/1"), field="f")
    with pytest.raises(InvalidRequest):
        UrlFetcher(allow_private=True, max_redirects=1).fetch(server.url("/1"), field="f")


def _only(*allowed: str) -> Callable[[Any], bool]:
    return lambda address: str(address) in allowed


def test_every_redirect_hop_is_rechecked(
    server_factory: Callable[..., LoopbackServer],
) -> None:
    first = server_factory("127.0.0.1")
    inner = server_factory("127.0.0.2")
    inner.routes["/secret"] = body_route(b"internal")
    first.routes["/go"] = redirect_route(inner.url("/secret"))
    narrow = UrlFetcher(address_policy=_only("127.0.0.1"))
    with pytest.raises(InvalidRequest) as info:
        narrow.fetch(first.url("/go"), field="image_1")
    assert first.hits["/go"] == 1
    assert inner.total_hits == 0
    # the message names neither the redirect's host nor its address
    assert "127.0.0.2" not in str(info.value)
    # the same chain passes when the policy allows both addresses
    wide = UrlFetcher(address_policy=_only("127.0.0.1", "127.0.0.2"))
    assert wide.fetch(first.url("/go"), field="image_1") == b"internal"


def test_connects_to_the_checked_address_not_a_second_dns_answer(
    server_factory: Callable[..., LoopbackServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = server_factory("127.0.0.1")
    evil = server_factory("127.0.0.2")
    good.routes["/img"] = body_route(b"good")
    evil.routes["/img"] = body_route(b"evil")
    real_getaddrinfo = socket.getaddrinfo
    answers = iter(["127.0.0.1"])

    def rebinding_dns(host: Any, *args: Any, **kwargs: Any) -> Any:
        # A rebinding resolver: first the checked address, then an internal one forever.
        if host == "rebind.test":
            host = next(answers, "127.0.0.2")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    fetcher = UrlFetcher(address_policy=_only("127.0.0.1"))
    assert fetcher.fetch(good.url("/img", host="rebind.test"), field="f") == b"good"
    assert evil.total_hits == 0


# --- size limits --------------------------------------------------------------------------


def test_huge_content_length_refused_before_reading(server: LoopbackServer) -> None:
    def liar(h: Any) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(10**12))
        h.end_headers()
        h.wfile.write(b"x" * 1024)

    server.routes["/huge"] = liar
    with pytest.raises(InvalidInput, match="larger than 1000000 bytes") as info:
        UrlFetcher(allow_private=True, max_bytes=1_000_000).fetch(server.url("/huge"), field="f")
    assert info.value.field == "f"


def test_chunked_body_bounded_while_streaming(server: LoopbackServer) -> None:
    server.routes["/stream"] = chunked_route(50 * 2**20)
    started = time.monotonic()
    with pytest.raises(InvalidInput):
        UrlFetcher(allow_private=True).fetch(server.url("/stream"), field="f", max_bytes=100_000)
    assert time.monotonic() - started < 5


def test_body_at_the_limit_passes(server: LoopbackServer) -> None:
    server.routes["/exact"] = chunked_route(100_000, chunk_bytes=7_000)
    data = UrlFetcher(allow_private=True).fetch(server.url("/exact"), field="f", max_bytes=100_000)
    assert len(data) == 100_000


def test_gzip_bomb_counted_decoded(server: LoopbackServer) -> None:
    compressed = gzip.compress(b"\0" * (8 * 2**20))
    assert len(compressed) < 100_000
    server.routes["/bomb"] = lambda h: send(h, 200, compressed, {"Content-Encoding": "gzip"})
    with pytest.raises(InvalidInput):
        UrlFetcher(allow_private=True).fetch(server.url("/bomb"), field="f", max_bytes=1_000_000)


# --- upstream failures --------------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 500])
def test_error_status_is_upstream_error(server: LoopbackServer, status: int) -> None:
    server.routes["/x"] = lambda h: send(h, status, b"nope")
    with pytest.raises(UpstreamError, match=str(status)) as info:
        UrlFetcher(allow_private=True).fetch(server.url("/x"), field="image_1")
    assert info.value.field == "image_1"
    assert info.value.http_status == 502


def test_connection_refused_is_upstream_error() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(UpstreamError):
        UrlFetcher(allow_private=True).fetch(f"http://127.0.0.1:{port}/", field="f")


def test_slow_response_times_out(server: LoopbackServer) -> None:
    server.routes["/slow"] = sleep_route(server, 10)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as info:
        UrlFetcher(allow_private=True, timeout_s=0.5).fetch(server.url("/slow"), field="f")
    assert time.monotonic() - started < 2
    assert info.value.http_status == 504


def test_dripping_body_hits_the_total_deadline(server: LoopbackServer) -> None:
    server.routes["/drip"] = drip_route(server, interval_s=0.05, total_bytes=1000)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        UrlFetcher(allow_private=True, timeout_s=0.5).fetch(server.url("/drip"), field="f")
    assert time.monotonic() - started < 1.5


def test_dripping_headers_hit_the_total_deadline(server: LoopbackServer) -> None:
    """Issue 13, defect 2: a header sent one byte at a time must not hold a worker past the
    fetch's deadline (each read is quick, so only a deadline over the whole exchange ends it)."""
    server.routes["/hdrip"] = header_drip_route(server, interval_s=0.05, total_bytes=1000)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        UrlFetcher(allow_private=True, timeout_s=0.5).fetch(server.url("/hdrip"), field="f")
    assert time.monotonic() - started < 1.5


# --- TLS: the pinned address keeps the host name for SNI and certificate checks -----------


def _self_signed_localhost(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_ctx = ssl.create_default_context(cadata=cert_pem.decode())
    return server_ctx, client_ctx


def test_https_verifies_the_host_name_not_the_pinned_ip(
    server_factory: Callable[..., LoopbackServer], tmp_path: Path
) -> None:
    server_ctx, client_ctx = _self_signed_localhost(tmp_path)
    srv = server_factory("127.0.0.1", server_ctx)
    srv.routes["/img"] = body_route(b"over tls")
    fetcher = UrlFetcher(allow_private=True, ssl_context=client_ctx)
    # the certificate names only "localhost": this passes only if SNI/verification use the name
    assert fetcher.fetch(srv.url("/img", host="localhost", scheme="https"), field="f") == (
        b"over tls"
    )
    # and verification is really on: the IP is not in the certificate
    with pytest.raises(UpstreamError):
        fetcher.fetch(srv.url("/img", host="127.0.0.1", scheme="https"), field="f")
