"""Fixtures: real `qwenserve serve` processes on free ports, driven over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import Server
from tests.redis_server import RedisServer, require_redis_server


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
