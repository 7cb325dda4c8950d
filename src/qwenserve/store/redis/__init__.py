"""The Redis backend: the store (store.py, its Lua scripts under lua/ assembled by scripts.py),
the worker registry (registry.py) and the shared connection (client.py). Key names are in
``qwenserve.store.redis_keys``; pub/sub listeners in ``qwenserve.store.redis_wakeup``."""

from __future__ import annotations

from qwenserve.store.redis.client import connect, unavailable_as_503
from qwenserve.store.redis.registry import RedisWorkerRegistry
from qwenserve.store.redis.store import RedisStore

__all__ = ["RedisStore", "RedisWorkerRegistry", "connect", "unavailable_as_503"]
