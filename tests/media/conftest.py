"""Fixtures for the media tests: real loopback HTTP(S) servers (see loopback.py)."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator

import pytest

from tests.media.loopback import LoopbackServer


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    srv = LoopbackServer()
    yield srv
    srv.close()


@pytest.fixture
def server_factory() -> Iterator[Callable[..., LoopbackServer]]:
    started: list[LoopbackServer] = []

    def start(host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None) -> LoopbackServer:
        srv = LoopbackServer(host, ssl_context)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.close()
