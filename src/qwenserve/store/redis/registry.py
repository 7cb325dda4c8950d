"""The worker registry (``qwenserve.store.workers``) in Redis."""

from __future__ import annotations

from typing import cast

import redis

from qwenserve.store.redis.client import RedisConnector, float_text, unavailable_as_503
from qwenserve.store.redis.scripts import source
from qwenserve.store.redis_keys import DEFAULT_NAMESPACE, LUA_KEY_FUNCTIONS, RedisKeys
from qwenserve.store.workers import WorkerInfo


class RedisWorkerRegistry:
    """A hash of announcements and a sorted set of when each lapses, so a killed worker drops
    out on its own."""

    def __init__(self, client: redis.Redis, *, namespace: str = DEFAULT_NAMESPACE) -> None:
        self._redis = client
        self.keys = RedisKeys(namespace)
        self._announce = client.register_script(LUA_KEY_FUNCTIONS + source("registry_announce"))

    @classmethod
    def from_url(cls, url: str, *, namespace: str = DEFAULT_NAMESPACE) -> RedisWorkerRegistry:
        """A registry on a Redis store URL (tests and tools; servers use ``open_backend``)."""
        return cls(RedisConnector.from_url(url).client(), namespace=namespace)

    def announce(self, info: WorkerInfo, *, ttl_s: float) -> None:
        with unavailable_as_503("the worker registry"):
            self._announce(
                keys=[self.keys.workers(), self.keys.workers_lapse()],
                args=[
                    self.keys.prefix,
                    info.worker_id,
                    info.to_json(),
                    float_text(info.last_seen + ttl_s),
                    float_text(info.last_seen),
                ],
            )

    def alive(self, *, now: float) -> list[WorkerInfo]:
        with unavailable_as_503("the worker registry"):
            lapse_key, since = self.keys.workers_lapse(), f"({float_text(now)}"
            ids = sorted(cast(list[str], self._redis.zrangebyscore(lapse_key, since, "+inf")))
            if not ids:
                return []
            infos = cast(list[str | None], self._redis.hmget(self.keys.workers(), ids))
        return [WorkerInfo.from_json(text) for text in infos if text is not None]

    def remove(self, worker_id: str) -> None:
        with unavailable_as_503("the worker registry"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.hdel(self.keys.workers(), worker_id)
            pipe.zrem(self.keys.workers_lapse(), worker_id)
            pipe.execute()

    def close(self) -> None:
        self._redis.close()
