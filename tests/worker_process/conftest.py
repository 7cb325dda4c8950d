"""Fixtures: the worker tests' clock, SQLite store, media store and funded key ($1), and the
redis-server of this folder's Redis tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenserve.accounts.keys import create_api_key
from qwenserve.media.storage import LocalMediaStore
from qwenserve.store.sqlite import SqliteStore
from tests.redis_server import RedisServer, require_redis_server
from tests.service.test_worker import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "jobs.db")
    yield store
    store.close()


@pytest.fixture
def media(tmp_path: Path) -> LocalMediaStore:
    return LocalMediaStore(tmp_path / "media")


@pytest.fixture
def key_id(store: SqliteStore, clock: Clock) -> str:
    _, key = create_api_key(store, name="t", credits_usd=1.0, rpm=0, now=clock())
    return str(key.id)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of its own (skips when none is installed)."""
    require_redis_server()
    with RedisServer() as server:
        yield server
