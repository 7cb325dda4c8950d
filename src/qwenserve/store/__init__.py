"""Stores: where jobs, keys, credits and rate limits live (SQLite embedded, Redis scaled out)."""

from __future__ import annotations

from qwenserve.config import Settings
from qwenserve.store.base import ApiKey, QueueStats, Store, SubmitOutcome


def open_store(settings: Settings) -> Store:
    """The store ``settings.store`` names.

    ``sqlite`` or ``sqlite:///PATH`` opens the embedded SQLite file; ``redis://`` or
    ``rediss://`` connects to Redis (imported only then, so the embedded setup needs no Redis).
    """
    store: Store
    if settings.store.startswith(("redis://", "rediss://")):
        from qwenserve.store.redis import RedisStore

        store = RedisStore.from_url(settings.store)
    else:
        from qwenserve.store.sqlite import SqliteStore

        store = SqliteStore(settings.sqlite_path)
    return store


__all__ = ["ApiKey", "QueueStats", "Store", "SubmitOutcome", "open_store"]
