"""Media in Redis, so that every API node can serve an image any worker produced.

Each item is a hash (``media:<id>``: data, content_type, expires_at) and a member of the
``media:expiry`` sorted set. ``get`` hides an item from ``expires_at`` on and ``purge_expired``
deletes it; a Redis TTL of ``expires_at - time.time() + expiry_grace_s`` is only a backstop for
a deployment where no purge runs (it follows the wall clock, because ``put`` is given no ``now``).
Items are bounded by ``max_bytes``, since Redis holds them in memory.
"""

from __future__ import annotations

import math
import time
from typing import cast

import redis

from qwenserve.media.storage import is_valid_media_id
from qwenserve.store.redis import RedisConnector, unavailable_as_503
from qwenserve.store.redis_keys import DEFAULT_NAMESPACE, RedisKeys

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_EXPIRY_GRACE_S = 60.0


class RedisMediaStore:
    """A ``MediaStore`` in Redis, shared by every node pointing at the same server.

    Args:
        client: a redis-py client with ``decode_responses=False`` (the data is bytes).
        namespace: key prefix (the same namespace as the job store keeps them together).
        max_bytes: the largest item ``put`` accepts.
        expiry_grace_s: how long past ``expires_at`` Redis keeps an item nobody purged.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        max_bytes: int = DEFAULT_MAX_BYTES,
        expiry_grace_s: float = DEFAULT_EXPIRY_GRACE_S,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self._redis = client
        self.keys = RedisKeys(namespace)
        self.max_bytes = max_bytes
        self.expiry_grace_s = expiry_grace_s

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> RedisMediaStore:
        """Media on a Redis store URL (tests and tools; servers use ``open_backend``),
        reconnecting with backoff like the job store."""
        client = RedisConnector.from_url(url).client(decode_responses=False)
        return cls(client, namespace=namespace, max_bytes=max_bytes)

    def close(self) -> None:
        self._redis.close()

    def put(self, media_id: str, data: bytes, content_type: str, *, expires_at: float) -> None:
        """Store ``data`` until ``expires_at``.

        Raises:
            ValueError: the id is outside the media id charset, or ``data`` is larger than
                ``max_bytes``.
        """
        if not is_valid_media_id(media_id):
            raise ValueError(f"invalid media id {media_id!r}")
        if len(data) > self.max_bytes:
            raise ValueError(
                f"media item of {len(data)} bytes is larger than max_bytes={self.max_bytes}"
            )
        ttl_ms = math.ceil((max(expires_at - time.time(), 0.0) + self.expiry_grace_s) * 1000)
        key = self.keys.media(media_id)
        with unavailable_as_503("the media store"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(
                key,
                mapping={
                    "data": bytes(data),
                    "content_type": content_type,
                    "expires_at": repr(float(expires_at)),
                },
            )
            pipe.pexpire(key, max(ttl_ms, 1))
            pipe.zadd(self.keys.media_expiry(), {media_id: expires_at})
            pipe.execute()

    def get(self, media_id: str, *, now: float) -> tuple[bytes, str] | None:
        if not is_valid_media_id(media_id):
            return None
        with unavailable_as_503("the media store"):
            data, content_type, expires_at = cast(
                list[bytes | None],
                self._redis.hmget(
                    self.keys.media(media_id), ["data", "content_type", "expires_at"]
                ),
            )
        if data is None or content_type is None or expires_at is None:
            return None
        if float(expires_at) <= now:
            return None
        return bytes(data), content_type.decode("utf-8")

    def delete(self, media_id: str) -> None:
        if not is_valid_media_id(media_id):
            return
        with unavailable_as_503("the media store"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(self.keys.media(media_id))
            pipe.zrem(self.keys.media_expiry(), media_id)
            pipe.execute()

    def purge_expired(self, *, now: float) -> int:
        """Delete the items expired at ``now``; returns how many were still there to delete."""
        with unavailable_as_503("the media store"):
            expired = cast(
                list[bytes], self._redis.zrangebyscore(self.keys.media_expiry(), "-inf", now)
            )
            if not expired:
                return 0
            ids = [item.decode("utf-8") for item in expired]
            pipe = self._redis.pipeline(transaction=True)
            for media_id in ids:
                pipe.delete(self.keys.media(media_id))
            pipe.zrem(self.keys.media_expiry(), *ids)
            replies = pipe.execute()
        return sum(int(deleted) for deleted in replies[:-1])
