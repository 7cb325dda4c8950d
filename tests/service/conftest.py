"""Fixtures: real `qwenserve serve` processes on free ports, driven over HTTP; the API in-process
over a real SQLite store (``api``); and the worker tests' clock, SQLite store, media store and
funded key."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from qwenserve.accounts.keys import create_api_key
from qwenserve.media.storage import LocalMediaStore
from qwenserve.store.base import Store
from qwenserve.store.sqlite import SqliteStore
from tests.processes import Server
from tests.redis_server import RedisServer, require_redis_server
from tests.service.inprocess import Harness, make_harness, open_test_store
from tests.service.test_worker import Clock


@pytest.fixture
def make_server(tmp_path: Path, shared_cache: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def make(*args: str, env: dict[str, str] | None = None, data_dir: Path | None = None) -> Server:
        server = Server(
            data_dir=data_dir or tmp_path / f"data{len(servers)}",
            cache_dir=shared_cache,
            extra_env=env or {},
            args=list(args),
        )
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Iterator[Server]:
    """A module-wide server with private URLs allowed (tests serve inputs from loopback)."""
    srv = Server(
        data_dir=tmp_path_factory.mktemp("data"),
        cache_dir=shared_cache,
        extra_env={"QWENSERVE_ALLOW_PRIVATE_URLS": "true", "QWENSERVE_FETCH_TIMEOUT_S": "2"},
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A redis-server for this session's in-process API tests (skips when none is installed)."""
    require_redis_server()
    with RedisServer() as redis_server:
        yield redis_server.url


# The worker tests' defaults (a module that needs another store, e.g. one per backend, defines
# its own fixture of the same name, which wins over these).
@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "jobs.db")


@pytest.fixture
def media(tmp_path: Path) -> LocalMediaStore:
    return LocalMediaStore(tmp_path / "media")


@pytest.fixture
def key_id(store: SqliteStore, clock: Clock) -> str:
    _, key = create_api_key(store, name="t", credits_usd=1.0, rpm=0, now=clock())
    return key.id


@pytest.fixture
def api_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The SQLite store behind ``api``."""
    yield from open_test_store("sqlite", tmp_path, request)


@pytest.fixture
async def api(api_store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    """The API in-process (ASGI) over ``api_store`` with default settings; a module that needs
    other settings or stores defines its own ``api``, which wins over this one."""
    async for harness in make_harness(api_store, tmp_path):
        yield harness
