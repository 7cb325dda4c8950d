"""Media in Redis, so that every API node can serve an image any worker produced.

Each item is a hash (``media:<id>``: data, content_type, expires_at) and a member of the
``media:expiry`` sorted set. ``get`` hides an item from ``expires_at`` on and ``purge_expired``
deletes it; a Redis TTL of ``expires_at - time.time() + expiry_grace_s`` is only a backstop for
a deployment where no purge runs (it follows the wall clock, because ``put`` is given no ``now``).
Items are bounded by ``max_bytes``, since Redis holds them in memory.

With ``min_replicas`` (``QWENSERVE_REDIS_MIN_REPLICAS``) a ``put`` returns only once that many
replicas hold the item, like a submit: a worker stores its image before it completes the job,
and the completion may land on a replica promoted after the primary died, so an image the dead
primary never passed on would leave a COMPLETED job whose image 404s on every node. An
unconfirmed put raises ``StoreUnavailable``; the worker puts it again (the image is kept).
"""

from __future__ import annotations

import math
import time
from typing import cast

import redis

from qwenserve.errors import StoreUnavailable
from qwenserve.media.storage import is_valid_media_id
from qwenserve.store.redis import RedisConnector, unavailable_as_503
from qwenserve.store.redis.client import STORE_RETRY_AFTER_S
from qwenserve.store.redis.replication import DEFAULT_REPLICA_WAIT_S, ReplicaWait
from qwenserve.store.redis_keys import DEFAULT_NAMESPACE, RedisKeys

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_EXPIRY_GRACE_S = 60.0

_PUT = """
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'content_type', ARGV[2], 'expires_at', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
return 1
"""
"""An item, its backstop TTL and its expiry entry in one step (a script, so that a ``WAIT`` can
follow it on the same connection)."""


class RedisMediaStore:
    """A ``MediaStore`` in Redis, shared by every node pointing at the same server.

    Args:
        client: a redis-py client with ``decode_responses=False`` (the data is bytes).
        namespace: key prefix (the same namespace as the job store keeps them together).
        max_bytes: the largest item ``put`` accepts.
        expiry_grace_s: how long past ``expires_at`` Redis keeps an item nobody purged.
        min_replicas: replicas that must hold an item before ``put`` returns (0: none).
        replica_wait_s: how long ``put`` waits for them.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        max_bytes: int = DEFAULT_MAX_BYTES,
        expiry_grace_s: float = DEFAULT_EXPIRY_GRACE_S,
        min_replicas: int = 0,
        replica_wait_s: float = DEFAULT_REPLICA_WAIT_S,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self._redis = client
        self.keys = RedisKeys(namespace)
        self.max_bytes = max_bytes
        self.expiry_grace_s = expiry_grace_s
        self._put = client.register_script(_PUT)
        self._replicas = ReplicaWait(
            client, min_replicas=min_replicas, wait_s=replica_wait_s, what="the media store"
        )

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
            StoreUnavailable: Redis unreachable, or fewer than ``min_replicas`` confirmed.
        """
        if not is_valid_media_id(media_id):
            raise ValueError(f"invalid media id {media_id!r}")
        if len(data) > self.max_bytes:
            raise ValueError(
                f"media item of {len(data)} bytes is larger than max_bytes={self.max_bytes}"
            )
        ttl_ms = math.ceil((max(expires_at - time.time(), 0.0) + self.expiry_grace_s) * 1000)
        _, replicated = self._replicas.run(
            self._put,
            [self.keys.media(media_id), self.keys.media_expiry()],
            [bytes(data), content_type, repr(float(expires_at)), max(ttl_ms, 1), media_id],
        )
        if not replicated:
            # Left in place: a put again writes the same id, and an item nobody completes with
            # is purged at its expiry like any other.
            raise StoreUnavailable(
                f"the media store could not confirm the item on {self._replicas.min_replicas} "
                "replica(s); retry later",
                field="store",
                retry_after_s=STORE_RETRY_AFTER_S,
            )

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
