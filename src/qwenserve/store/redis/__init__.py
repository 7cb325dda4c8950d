"""The Redis backend: the store (store.py, its Lua scripts under lua/ assembled by scripts.py),
the worker registry (registry.py) and the connection factory (client.py: ``RedisConnector``, one
server or a Sentinel-watched primary). Key names are in
``qwenserve.store.redis_keys``; pub/sub listeners in ``qwenserve.store.redis_wakeup``."""

from __future__ import annotations

from qwenserve.store.redis.client import RedisConnector, unavailable_as_503
from qwenserve.store.redis.registry import RedisWorkerRegistry
from qwenserve.store.redis.store import RedisStore
from qwenserve.store.redis_target import RedisTarget

__all__ = [
    "RedisConnector",
    "RedisStore",
    "RedisTarget",
    "RedisWorkerRegistry",
    "unavailable_as_503",
]
