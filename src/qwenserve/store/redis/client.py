"""Every Redis connection of a process comes from one ``RedisConnector``, built from the one
parsed store URL (``qwenserve.backends.parse_store_url``): the job store, the worker registry, the
media store and the pub/sub subscribers. A ``RedisTarget`` is one server (``redis://``) or a
service that Sentinels watch (``redis+sentinel://``); with Sentinel every new connection asks
the Sentinels where the primary is, so after a failover the clients find the new one on their
own (and the Lua scripts, sent by SHA, are loaded again on its first NOSCRIPT). While no primary
answers, calls fail as ``StoreUnavailable`` (a 503 with ``Retry-After``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from qwenserve.errors import StoreUnavailable
from qwenserve.store.redis_target import RedisTarget

RECONNECT_RETRIES = 6
RECONNECT_BACKOFF_BASE_S = 0.05
RECONNECT_BACKOFF_CAP_S = 1.0
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
SENTINEL_TIMEOUT_S = 0.5
"""A Sentinel that does not answer within this is skipped for the next one."""
STORE_RETRY_AFTER_S = 5.0
"""What a 503 during an outage tells clients to wait: past the reconnect backoff."""

log = logging.getLogger("qwenserve.store")


class RedisConnector:
    """The one connection factory of a process: every Redis client comes from here.

    Args:
        target: where Redis is (``RedisTarget``).
    """

    def __init__(self, target: RedisTarget) -> None:
        self.target = target
        self._sentinel: Sentinel | None = None
        if target.uses_sentinel:
            self._sentinel = Sentinel(
                list(target.sentinels),
                sentinel_kwargs={
                    "socket_timeout": SENTINEL_TIMEOUT_S,
                    "socket_connect_timeout": SENTINEL_TIMEOUT_S,
                },
            )

    @classmethod
    def from_url(cls, url: str) -> RedisConnector:
        """A connector for a Redis store URL, parsed by the one parser (tests and tools).

        Raises:
            ValueError: not a Redis store URL.
        """
        from qwenserve.backends import parse_store_url  # the parser sits above the store layer

        target = parse_store_url(url)
        if not isinstance(target, RedisTarget):
            raise ValueError(f"not a Redis store URL: {url!r}")
        return cls(target)

    def client(self, *, decode_responses: bool = True) -> redis.Redis:
        """A client that reconnects with backoff when Redis restarts, the link drops or (with
        Sentinel) the primary moves; a call that still fails raises a ConnectionError."""
        retry = Retry(
            ExponentialBackoff(cap=RECONNECT_BACKOFF_CAP_S, base=RECONNECT_BACKOFF_BASE_S),
            RECONNECT_RETRIES,
            supported_errors=(redis.ConnectionError, redis.TimeoutError, TimeoutError),
        )
        return self._make(decode_responses=decode_responses, retry=retry)

    def subscriber_client(
        self, *, connect_timeout_s: float, socket_timeout_s: float
    ) -> redis.Redis:
        """A client for a pub/sub loop that does its own reconnecting (no retries here)."""
        return self._make(
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),
            connect_timeout_s=connect_timeout_s,
            socket_timeout_s=socket_timeout_s,
        )

    def _make(
        self,
        *,
        decode_responses: bool,
        retry: Retry,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        socket_timeout_s: float = SOCKET_TIMEOUT_S,
    ) -> redis.Redis:
        target = self.target
        options: dict[str, Any] = {
            "db": target.db,
            "username": target.username,
            "password": target.password,
            "decode_responses": decode_responses,
            "retry": retry,
            "socket_timeout": socket_timeout_s,
            "socket_connect_timeout": connect_timeout_s,
        }
        if self._sentinel is not None:
            client: redis.Redis = self._sentinel.master_for(target.service, **options)
            return client
        return redis.Redis(host=target.host, port=target.port, ssl=target.tls, **options)

    def close(self) -> None:
        """Drop the connections to the Sentinels (the clients close their own)."""
        if self._sentinel is not None:
            for node in self._sentinel.sentinels:
                node.close()


@contextmanager
def unavailable_as_503(what: str) -> Iterator[None]:
    """Turn a Redis that stays unreachable after the retries (or a failover in progress) into
    StoreUnavailable: a 503 with Retry-After."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as error:
        # ReadOnlyError: a primary demoted to a replica answers writes with READONLY until the
        # client reconnects (a plain redis:// URL after a failover). The details (the store's
        # address) are for the logs, never for a client.
        log.warning("%s: Redis unreachable: %s", what, error)
        raise StoreUnavailable(
            f"{what} is unavailable; retry later", field="store", retry_after_s=STORE_RETRY_AFTER_S
        ) from None


def float_text(value: float) -> str:
    """Times are stored as Python's shortest exact repr, so they round-trip bit for bit."""
    return repr(float(value))


def pairs(flat: Sequence[Any]) -> dict[str, str]:
    """A Lua HGETALL reply (k1, v1, k2, v2, …) as a dict."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}
