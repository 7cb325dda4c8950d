"""Stores: where jobs, keys, credits, rate limits and the job event log live (SQLite embedded,
Redis scaled out), and the worker registry beside them.

``open_store`` and ``open_registry`` are the only places that ask "SQLite or Redis?".
"""

from __future__ import annotations

from qwenserve.config import Settings
from qwenserve.store.base import ApiKey, Heartbeat, QueueStats, Store, SubmitOutcome
from qwenserve.store.workers import WorkerRegistry


def _is_redis(settings: Settings) -> bool:
    return settings.store.startswith(("redis://", "rediss://"))


def open_store(settings: Settings) -> Store:
    """The store ``settings.store`` names.

    ``sqlite`` or ``sqlite:///PATH`` opens the embedded SQLite file; ``redis://`` or
    ``rediss://`` connects to Redis (imported only then, so the embedded setup needs no Redis).
    """
    store: Store
    if _is_redis(settings):
        from qwenserve.store.redis import RedisStore

        store = RedisStore.from_url(settings.store)
    else:
        from qwenserve.store.sqlite import SqliteStore

        store = SqliteStore(settings.sqlite_path)
    return store


def open_registry(settings: Settings) -> WorkerRegistry:
    """The worker registry beside ``settings.store``: a table in SQLite, keys with a TTL in
    Redis."""
    if _is_redis(settings):
        from qwenserve.store.redis import RedisWorkerRegistry

        return RedisWorkerRegistry.from_url(settings.store)
    from qwenserve.store.workers import SqliteWorkerRegistry

    return SqliteWorkerRegistry(settings.sqlite_path)


__all__ = [
    "ApiKey",
    "Heartbeat",
    "QueueStats",
    "Store",
    "SubmitOutcome",
    "open_registry",
    "open_store",
]
