"""Stores: where jobs, keys, credits and rate limits live (SQLite embedded, Redis scaled out)."""

from __future__ import annotations

from qwenserve.config import Settings
from qwenserve.store.base import ApiKey, QueueStats, Store, SubmitOutcome


def open_store(settings: Settings) -> Store:
    """The store ``settings.store`` names: SQLite (default) or Redis."""
    if settings.store.startswith(("redis://", "rediss://")):
        from qwenserve.store.redis import RedisStore

        return RedisStore.from_url(settings.store)
    from qwenserve.store.sqlite import SqliteStore

    return SqliteStore(settings.sqlite_path)


__all__ = ["ApiKey", "QueueStats", "Store", "SubmitOutcome", "open_store"]
