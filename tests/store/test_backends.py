"""The backend switch: ``open_backend`` gives every part from one backend (SQLite files, or one
real redis-server), and no other module in src/ decides between them."""

from __future__ import annotations

import queue
import re
from pathlib import Path

import pytest
import redis

from qwenserve.backends import RedisSignals, open_backend
from qwenserve.config import Settings
from qwenserve.media.redis_storage import RedisMediaStore
from qwenserve.media.storage import LocalMediaStore, new_media_id
from qwenserve.store.redis import RedisStore, RedisWorkerRegistry
from qwenserve.store.sqlite import SqliteStore
from qwenserve.store.workers import SqliteWorkerRegistry, WorkerInfo
from tests.store.contract import Clock, make_job, make_key

SRC = Path(__file__).resolve().parents[2] / "src" / "qwenserve"
HEAR_TIMEOUT_S = 5.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_sqlite_gives_files_in_the_data_dir_and_no_signals(tmp_path: Path, clock: Clock) -> None:
    backend = open_backend(Settings(data_dir=tmp_path / "data"))
    try:
        assert isinstance(backend.store, SqliteStore)
        assert backend.store.path == tmp_path / "data" / "qwenserve.db"
        assert isinstance(backend.registry, SqliteWorkerRegistry)
        assert isinstance(backend.media, LocalMediaStore)
        assert (backend.signals, backend.shared) == (None, False)
        make_key(backend.store, clock)
        media_id = new_media_id()
        backend.media.put(media_id, b"png", "image/png", expires_at=clock.now + 60)
    finally:
        backend.close()
    assert (tmp_path / "data" / "qwenserve.db").exists()
    assert any(media_id in p.name for p in (tmp_path / "data" / "media").rglob("*"))
    explicit_path = tmp_path / "elsewhere.db"
    explicit = open_backend(Settings(data_dir=tmp_path, store=f"sqlite:///{explicit_path}"))
    try:
        assert isinstance(explicit.store, SqliteStore) and explicit.store.path == explicit_path
    finally:
        explicit.close()


@pytest.mark.redis
def test_redis_gives_every_part_on_that_server(
    redis_url: str, redis_client: redis.Redis, clock: Clock
) -> None:
    backend = open_backend(Settings(store=redis_url))
    try:
        assert isinstance(backend.store, RedisStore)
        assert isinstance(backend.registry, RedisWorkerRegistry)
        assert isinstance(backend.media, RedisMediaStore)
        assert backend.signals == RedisSignals(redis_url) and backend.shared
        key = make_key(backend.store, clock)
        assert redis_client.exists(f"qs:key:{key.id}")
        media_id = new_media_id()
        backend.media.put(media_id, b"png", "image/png", expires_at=clock.now + 60)
        assert any(media_id in name for name in redis_client.keys("*"))
        info = WorkerInfo(
            worker_id="w1",
            host="h",
            slugs=(),
            resident=(),
            current_job=None,
            started_at=clock.now,
            last_seen=clock.now,
        )
        backend.registry.announce(info, ttl_s=60)
        assert [w.worker_id for w in backend.registry.alive(now=clock.now)] == ["w1"]
    finally:
        backend.close()


@pytest.mark.redis
def test_redis_signals_hear_a_submit_on_any_connection(
    redis_url: str, redis_client: redis.Redis, clock: Clock
) -> None:
    backend = open_backend(Settings(store=redis_url))
    assert backend.signals is not None
    heard: queue.Queue[str | None] = queue.Queue()
    subscriber = backend.signals.on_queued(heard.put)
    try:
        assert subscriber.wait_subscribed(HEAR_TIMEOUT_S)
        other = RedisStore.from_url(redis_url)  # another node's connection
        try:
            job = make_job(make_key(other, clock), clock)
            other.submit(job, rpm=0, now=clock.now)
        finally:
            other.close()
        slugs = []
        while (slug := heard.get(timeout=HEAR_TIMEOUT_S)) != job.slug:
            slugs.append(slug)  # None: the look-once call after subscribing
        assert set(slugs) <= {None}
    finally:
        subscriber.close()
        backend.close()


def test_only_the_backend_switch_asks_sqlite_or_redis() -> None:
    """A scheme test (``startswith("redis://")``) chooses a backend; only backends.py may. Config
    validates the form and the Redis modules refuse other URLs: those test but do not choose.
    Likewise only backends.py (and the Redis modules themselves) import a Redis module."""
    checks_scheme = re.compile(r"startswith\([^)]*rediss?://")
    allowed_checks = {"backends.py", "config.py", "store/redis_wakeup.py"}
    imports_redis = re.compile(
        r"^\s*(from|import) (redis\b|qwenserve\.(store\.redis|media\.redis_storage))", re.M
    )
    askers, users = [], []
    for path in SRC.rglob("*.py"):
        name = path.relative_to(SRC).as_posix()
        text = path.read_text()
        if checks_scheme.search(text) and name not in allowed_checks:
            askers.append(name)
        inside_redis = name.startswith("store/redis") or name == "media/redis_storage.py"
        if imports_redis.search(text) and not inside_redis and name != "backends.py":
            users.append(name)
    assert askers == [] and users == []
