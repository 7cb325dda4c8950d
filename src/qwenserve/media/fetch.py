"""Fetching client-named URLs without letting clients reach our network (SSRF guard).

A request parameter such as ``image_1`` or ``lora_2_url`` makes *our* server open a connection,
so the fetcher decides where it may connect, not the client:

- only ``http`` and ``https``, no credentials in the URL;
- the host is resolved once with ``getaddrinfo`` and the fetch is refused when *any* resolved
  address is not public (loopback, private, link-local, multicast, reserved, unspecified,
  shared/CGNAT, or an IPv6 form embedding one of those), unless ``allow_private``;
- the connection goes to the address that was checked. The request URL carries the checked IP
  literal while the ``Host`` header and the TLS SNI / certificate check keep the original host
  name (httpcore's ``sni_hostname`` extension), so a second DNS answer can never be used
  (no DNS-rebinding window). Proxies from the environment are ignored for the same reason;
- redirects are followed here, hop by hop, each hop checked as above, at most ``max_redirects``;
- the body is streamed and abandoned as soon as it passes ``max_bytes`` (``Content-Length`` is
  checked first); decoded (gzip) bytes are what is counted;
- one deadline of ``timeout_s`` covers the whole fetch, every hop: each connect, TLS
  handshake, header read and body read is clamped to what is left of it
  (``media/deadline.py``), so a server that drips its headers or its body a byte at a time
  cannot hold a worker past it (name resolution uses the system resolver's own timeouts).

Errors never carry the addresses the host resolved to, only what the client sent.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from qwenserve.errors import InvalidInput, InvalidRequest, UpstreamError, UpstreamTimeout
from qwenserve.media.deadline import DeadlineTransport

DEFAULT_MAX_BYTES = 25 * 2**20
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_HOST_RE = re.compile(r"^[A-Za-z0-9._-]+$")
# Images and LoRA files are compressed already; asking for identity keeps a server from
# sending a gzip body that inflates far beyond its size on the wire. One that sends it anyway
# is decoded and counted after decoding (so at most one network read inflates unchecked).
_HEADERS = {"User-Agent": "qwenserve-fetch/1", "Accept": "*/*", "Accept-Encoding": "identity"}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# NAT64 (RFC 6052) embeds an IPv4 address in its last 32 bits; a gateway would forward to it.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def is_public_address(address: IPAddress) -> bool:
    """True when ``address`` is a globally routable unicast address a fetch may connect to.

    IPv6 addresses that embed an IPv4 address (IPv4-mapped, 6to4, Teredo, NAT64) are judged by
    the embedded address as well, since traffic to them ends up there.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded: list[ipaddress.IPv4Address] = []
        if address.ipv4_mapped is not None:
            embedded.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            embedded.append(address.sixtofour)
        if address.teredo is not None:
            embedded.extend(address.teredo)
        if address in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if not all(is_public_address(inner) for inner in embedded):
            return False
        if address.ipv4_mapped is not None:
            return True  # judged entirely by the IPv4 address it maps to
    refused = (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )
    # is_global also excludes ranges none of the flags above name (100.64.0.0/10, CGNAT).
    return not refused and address.is_global


def refuse_literal_private_host(
    url: str, *, field: str, policy: Callable[[IPAddress], bool] = is_public_address
) -> None:
    """Refuse, without any DNS lookup, an http(s) URL whose host is written as a private or
    loopback address: an IP literal ``policy`` refuses, or ``localhost``.

    The API calls it when a job is submitted (v1, v2 alike), so such a URL is a 400 before any
    charge rather than a failed job; the worker's fetch still checks every address a name
    resolves to (``UrlFetcher.resolve_allowed``), which is where names that lead to private
    addresses are caught. Malformed URLs are left to the fetch, which names the fault.

    Raises InvalidRequest naming ``field``, with the fetch's own wording.
    """
    try:
        host = _parse_url(url, field=field, redirected=False).host.rstrip(".").lower()
    except InvalidRequest:
        return
    addresses: list[IPAddress]
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always loopback
        addresses = [ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")]
    else:
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            return  # a name: judged by what it resolves to, at fetch time
    if not all(policy(address) for address in addresses):
        raise InvalidRequest(
            f"{field}: the host {host!r} is a private, loopback or reserved address, "
            "which this server does not fetch from",
            field=field,
        )


def _parse_url(url: str, *, field: str, redirected: bool) -> httpx.URL:
    """Check a URL's shape: scheme, host syntax and the absence of credentials."""
    where = "a redirect" if redirected else "the URL"
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise InvalidRequest(f"{field}: {where} is not a valid URL", field=field) from exc
    if parsed.scheme not in ("http", "https"):
        raise InvalidRequest(
            f"{field}: {where} must use http or https, not {parsed.scheme or 'no scheme'!r}",
            field=field,
        )
    host = parsed.host
    if not host:
        raise InvalidRequest(f"{field}: {where} has no host", field=field)
    if parsed.userinfo:
        raise InvalidRequest(f"{field}: {where} must not contain credentials", field=field)
    if ":" not in host and not _HOST_RE.match(parsed.raw_host.decode("ascii", "replace")):
        raise InvalidRequest(f"{field}: {where} has an invalid host name", field=field)
    return parsed


class UrlFetcher:
    """SSRF-guarded http(s) fetcher with bounded time and size.

    One instance may be shared between threads: each fetch uses its own short-lived connections
    (no keep-alive), so a connection verified for one host name is never reused for another.

    ``address_policy`` decides which resolved addresses may be connected to when
    ``allow_private`` is false (default: :func:`is_public_address`); an operator can widen it
    to one internal network, and tests narrow it to one loopback address. ``ssl_context``
    replaces the default certificate store (certifi); tests pass one trusting a self-signed
    certificate.
    """

    def __init__(
        self,
        *,
        allow_private: bool = False,
        timeout_s: float = 20.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_redirects: int = 5,
        address_policy: Callable[[IPAddress], bool] = is_public_address,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if max_redirects < 0:
            raise ValueError("max_redirects must not be negative")
        self.allow_private = allow_private
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.address_policy = address_policy
        self._ssl_context = ssl_context if ssl_context is not None else httpx.create_ssl_context()

    def fetch(self, url: str, *, field: str, max_bytes: int | None = None) -> bytes:
        """Return the body of ``url``.

        Raises InvalidRequest (refused URL, redirect or address), InvalidInput (body larger than
        ``max_bytes``, default the fetcher's), UpstreamError (connection failure or an HTTP
        error status) and UpstreamTimeout; each names ``field``.
        """
        return self.fetch_typed(url, field=field, max_bytes=max_bytes)[0]

    def fetch_typed(
        self, url: str, *, field: str, max_bytes: int | None = None
    ) -> tuple[bytes, str | None]:
        """The body of ``url`` and the ``Content-Type`` it was served with (None when the
        server sent none), so a caller can say what came instead of an image. Raises as
        :meth:`fetch`."""
        body = bytearray()
        content_type = self._fetch(url, field=field, max_bytes=max_bytes, sink=body.extend)
        return bytes(body), content_type

    def fetch_to_file(
        self, url: str, dest: Path, *, field: str, max_bytes: int | None = None
    ) -> str:
        """Stream the body of ``url`` into ``dest`` and return its sha256 (hex).

        ``dest`` is created or truncated, and removed again when the fetch fails. Raises as
        :meth:`fetch`.
        """
        digest = hashlib.sha256()
        try:
            with dest.open("wb") as handle:

                def sink(chunk: bytes) -> None:
                    handle.write(chunk)
                    digest.update(chunk)

                self._fetch(url, field=field, max_bytes=max_bytes, sink=sink)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return digest.hexdigest()

    def resolve_allowed(
        self, host: str, port: int, *, field: str, redirected: bool = False
    ) -> list[str]:
        """Resolve ``host`` and return its addresses, all checked against the address policy.

        Raises InvalidRequest when any address is not public (and private ones are not
        allowed) and UpstreamError when the name does not resolve. A ``redirected`` host came
        from the upstream server, not the client, so messages do not name it.
        """
        what = "a redirect target" if redirected else f"the host {host!r}"
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise UpstreamError(f"{field}: could not resolve {what}", field=field) from exc
        addresses: list[str] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            text = str(sockaddr[0])
            try:
                address = ipaddress.ip_address(text)
            except ValueError as exc:  # pragma: no cover - getaddrinfo returns numeric addresses
                raise UpstreamError(f"{field}: could not resolve {what}", field=field) from exc
            if not self.allow_private and not self.address_policy(address):
                raise InvalidRequest(
                    f"{field}: {what} is a private, loopback or reserved address, "
                    "which this server does not fetch from",
                    field=field,
                )
            # A scoped IPv6 address (fe80::1%eth0) cannot be written into a URL to pin it.
            if "%" not in text and text not in addresses:
                addresses.append(text)
        if not addresses:
            raise UpstreamError(f"{field}: could not resolve {what}", field=field)
        return addresses

    def _fetch(
        self,
        url: str,
        *,
        field: str,
        max_bytes: int | None,
        sink: Callable[[bytes], None],
    ) -> str | None:
        """Stream the final response's body into ``sink``; returns its Content-Type."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        deadline = time.monotonic() + self.timeout_s
        current = _parse_url(url, field=field, redirected=False)
        with httpx.Client(
            # No environment proxy (it would connect to a host we did not check) and one
            # deadline over every connect, header and body read of every hop.
            transport=DeadlineTransport(deadline, ssl_context=self._ssl_context),
            trust_env=False,
            follow_redirects=False,
            headers=_HEADERS,
        ) as client:
            redirects = 0
            while True:
                location, content_type = self._get_once(
                    client, current, field, limit, deadline, sink, redirected=redirects > 0
                )
                if location is None:
                    return content_type
                if redirects >= self.max_redirects:
                    raise InvalidRequest(
                        f"{field}: the URL redirected more than {self.max_redirects} times",
                        field=field,
                    )
                redirects += 1
                try:
                    joined = str(current.join(location))
                except (httpx.InvalidURL, TypeError, ValueError) as exc:
                    raise InvalidRequest(
                        f"{field}: a redirect is not a valid URL", field=field
                    ) from exc
                current = _parse_url(joined, field=field, redirected=True)

    def _get_once(
        self,
        client: httpx.Client,
        url: httpx.URL,
        field: str,
        limit: int,
        deadline: float,
        sink: Callable[[bytes], None],
        *,
        redirected: bool,
    ) -> tuple[str | None, str | None]:
        """One GET to a checked address; returns the redirect location (None when done) and
        the response's Content-Type."""
        host = url.raw_host.decode("ascii")  # IDNA-encoded: what DNS and SNI expect
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = self.resolve_allowed(host, port, field=field, redirected=redirected)
        last_error: httpx.ConnectError | None = None
        for address in addresses:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise UpstreamTimeout(f"{field}: the URL did not answer in time", field=field)
            pinned = url.copy_with(host=address, fragment=None)
            try:
                with client.stream(
                    "GET",
                    pinned,
                    headers={"Host": url.netloc.decode("ascii")},
                    extensions={"sni_hostname": host},
                    timeout=httpx.Timeout(remaining_s),
                ) as response:
                    location = self._read(response, field, limit, deadline, sink)
                    return location, response.headers.get("content-type")
            except httpx.ConnectError as exc:
                last_error = exc  # try the host's next checked address
            except httpx.TimeoutException as exc:
                raise UpstreamTimeout(
                    f"{field}: the URL did not answer in time", field=field
                ) from exc
            except httpx.HTTPError as exc:
                raise UpstreamError(
                    f"{field}: the connection to the URL failed while reading", field=field
                ) from exc
        raise UpstreamError(f"{field}: could not connect to the URL", field=field) from last_error

    def _read(
        self,
        response: httpx.Response,
        field: str,
        limit: int,
        deadline: float,
        sink: Callable[[bytes], None],
    ) -> str | None:
        if response.status_code in _REDIRECT_STATUSES:
            location = str(response.headers.get("location", ""))
            if not location:
                raise UpstreamError(
                    f"{field}: the URL answered a redirect without a location", field=field
                )
            return location
        if not 200 <= response.status_code < 300:
            raise UpstreamError(
                f"{field}: could not fetch the URL (HTTP {response.status_code})", field=field
            )
        declared = response.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise InvalidInput(f"{field}: the file is larger than {limit} bytes", field=field)
        received = 0
        for chunk in response.iter_bytes():  # as they arrive, so the deadline is checked
            received += len(chunk)
            if received > limit:
                raise InvalidInput(f"{field}: the file is larger than {limit} bytes", field=field)
            if time.monotonic() > deadline:
                raise UpstreamTimeout(f"{field}: the URL did not answer in time", field=field)
            sink(chunk)
        return None
