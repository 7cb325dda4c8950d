"""One wall-clock deadline over a whole HTTP exchange: connect, TLS, headers, body.

httpx's timeouts bound each network operation, not their sum: an upstream that sends a header
one byte per second answers every read in time and holds the caller for hours. Here the network
backend itself clamps every connect, read and write to what is left of one deadline, and refuses
to start one once it has passed, so no phase of the exchange (the header read included) can
outlive it. No watchdog thread is needed: a socket blocked in ``recv`` wakes at the deadline.
"""

from __future__ import annotations

import ssl
import time
import typing
from collections.abc import Iterable

import httpcore
import httpx

__all__ = ["DeadlineTransport"]

_Timeout = type[httpcore.ConnectTimeout] | type[httpcore.ReadTimeout] | type[httpcore.WriteTimeout]


def _left_s(deadline: float, timeout: float | None, error: _Timeout) -> float:
    """The smaller of ``timeout`` and what is left until ``deadline`` (monotonic seconds);
    ``error`` when nothing is left."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the exchange's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left_s(self._deadline, timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left_s(self._deadline, timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        left = _left_s(self._deadline, timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._inner.start_tls(ssl_context, server_hostname, left), self._deadline
        )

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, deadline: float) -> None:
        self._inner = httpcore.SyncBackend()
        self._deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        left = _left_s(self._deadline, timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(host, port, left, local_address, socket_options)
        return _DeadlineStream(stream, self._deadline)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:  # pragma: no cover - fetches never use Unix sockets
        left = _left_s(self._deadline, timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_unix_socket(path, left, socket_options)
        return _DeadlineStream(stream, self._deadline)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class DeadlineTransport(httpx.HTTPTransport):
    """An httpx transport (no proxies, no keep-alive) whose every network operation ends by
    ``deadline`` (``time.monotonic()`` seconds); past it, httpx raises a ``TimeoutException``.

    Make one per exchange: the deadline is fixed when it is made.
    """

    def __init__(self, deadline: float, *, ssl_context: ssl.SSLContext) -> None:
        super().__init__(verify=ssl_context, trust_env=False)
        self._pool.close()
        # httpx takes no network backend, but its pool does; the rest of the transport
        # (request mapping, exception mapping) is httpx's own.
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_keepalive_connections=0,
            network_backend=_DeadlineBackend(deadline),
        )
