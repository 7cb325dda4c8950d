"""The embedded SQLite store: ``SqliteStore`` (store.py) over per-thread connections
(connection.py) and a migrated schema (schema.py)."""

from __future__ import annotations

from qwenserve.store.sqlite.connection import DEFAULT_BUSY_TIMEOUT_S
from qwenserve.store.sqlite.schema import SCHEMA_VERSION
from qwenserve.store.sqlite.store import SqliteStore

__all__ = ["DEFAULT_BUSY_TIMEOUT_S", "SCHEMA_VERSION", "SqliteStore"]
