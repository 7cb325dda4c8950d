"""The one lookup of redis-server for the tests: found on PATH, else a clear skip (or a failure
where the Redis suite must run)."""

from __future__ import annotations

import pytest

from tests.redis_server import MISSING, RedisServer, redis_server_binary, require_redis_server


def test_a_missing_binary_skips_saying_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENSERVE_TEST_REDIS_SERVER", "no-such-redis-server")
    monkeypatch.delenv("QWENSERVE_REQUIRE_REDIS", raising=False)
    assert redis_server_binary() is None
    with pytest.raises(pytest.skip.Exception, match="apt-get install redis-server"):
        require_redis_server()
    with pytest.raises(RuntimeError, match="needs redis-server on PATH"):
        RedisServer().start()


def test_a_missing_binary_fails_where_redis_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENSERVE_TEST_REDIS_SERVER", "no-such-redis-server")
    monkeypatch.setenv("QWENSERVE_REQUIRE_REDIS", "1")
    with pytest.raises(pytest.fail.Exception, match="QWENSERVE_REQUIRE_REDIS"):
        require_redis_server()


def test_the_binary_is_found_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWENSERVE_TEST_REDIS_SERVER", raising=False)
    binary = require_redis_server()
    assert binary.endswith("redis-server")
    with RedisServer() as server:
        assert server.binary == binary and server.running
    assert MISSING.startswith("needs redis-server")
