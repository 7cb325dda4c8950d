"""The Redis connection every Redis-backed part shares: reconnects with backoff, and turns a
Redis that stays away into a 503."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from qwenserve.errors import ServiceUnavailable

RECONNECT_RETRIES = 6
RECONNECT_BACKOFF_BASE_S = 0.05
RECONNECT_BACKOFF_CAP_S = 1.0
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
STORE_RETRY_AFTER_S = 5.0
"""What a 503 during an outage tells clients to wait: past the reconnect backoff."""

log = logging.getLogger("qwenserve.store")


def connect(url: str, *, decode_responses: bool = True) -> redis.Redis:
    """A client for ``url`` that reconnects (with backoff) when Redis restarts or the link drops.

    Raises:
        ValueError: the URL is not a redis:// or rediss:// URL.
    """
    retry = Retry(
        ExponentialBackoff(cap=RECONNECT_BACKOFF_CAP_S, base=RECONNECT_BACKOFF_BASE_S),
        RECONNECT_RETRIES,
        supported_errors=(redis.ConnectionError, redis.TimeoutError, TimeoutError),
    )
    client: redis.Redis = redis.Redis.from_url(
        url,
        decode_responses=decode_responses,
        retry=retry,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )
    return client


@contextmanager
def unavailable_as_503(what: str) -> Iterator[None]:
    """Turn a Redis that stays unreachable after the retries into ServiceUnavailable."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as error:
        # The details (the store's address) are for the logs, never for a client.
        log.warning("%s: Redis unreachable: %s", what, error)
        raise ServiceUnavailable(
            f"{what} is unavailable; retry later", field="store", retry_after_s=STORE_RETRY_AFTER_S
        ) from None


def float_text(value: float) -> str:
    """Times are stored as Python's shortest exact repr, so they round-trip bit for bit."""
    return repr(float(value))


def pairs(flat: Sequence[Any]) -> dict[str, str]:
    """A Lua HGETALL reply (k1, v1, k2, v2, …) as a dict."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}
