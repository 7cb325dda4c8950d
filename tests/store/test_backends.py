"""The backend switch: ``open_backend`` gives every part from one backend (SQLite files, or one
real redis-server), and no other module in src/ decides between them."""

from __future__ import annotations

import ast
import queue
import re
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from qwenserve.backends import (
    LocalSignals,
    RedisSignals,
    SqliteTarget,
    open_backend,
    parse_store_url,
)
from qwenserve.config import Settings
from qwenserve.media.redis_storage import RedisMediaStore
from qwenserve.media.storage import LocalMediaStore, new_media_id
from qwenserve.store.redis import RedisStore, RedisTarget, RedisWorkerRegistry
from qwenserve.store.sqlite import SqliteStore
from qwenserve.store.workers import SqliteWorkerRegistry, WorkerInfo
from tests.store.contract import Clock, make_job, make_key

SRC = Path(__file__).resolve().parents[2] / "src" / "qwenserve"
HEAR_TIMEOUT_S = 5.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_sqlite_gives_files_in_the_data_dir_and_in_process_signals(
    tmp_path: Path, clock: Clock
) -> None:
    backend = open_backend(Settings(data_dir=tmp_path / "data"))
    try:
        assert isinstance(backend.store, SqliteStore)
        assert backend.store.path == tmp_path / "data" / "qwenserve.db"
        assert isinstance(backend.registry, SqliteWorkerRegistry)
        assert isinstance(backend.media, LocalMediaStore)
        assert type(backend.signals) is LocalSignals and backend.connector is None
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
        assert isinstance(backend.signals, RedisSignals)
        assert backend.signals.connector is backend.connector is not None
        assert backend.connector.target.describe() == redis_url
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


_SCHEME = re.compile(r"^(redis(\+sentinel)?|rediss|sqlite|unix)(://|$)")
_CLIENT_MAKERS = {"Redis", "StrictRedis", "Sentinel", "from_url", "master_for", "parse_url"}


def _scheme_tests(tree: ast.AST) -> list[str]:
    """String constants naming a store scheme that code compares with or passes to a call
    (``startswith("redis://")``, ``== "sqlite"``, ``removeprefix("sqlite:///")``): parsing.
    Docstrings and help texts are neither, so they are not counted."""
    found = []
    for node in ast.walk(tree):
        operands: list[ast.expr] = []
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            operands = list(node.args)
        for operand in operands:
            for leaf in ast.walk(operand):
                text = leaf.value if isinstance(leaf, ast.Constant) else None
                if isinstance(text, str) and _SCHEME.match(text):
                    found.append(f"line {leaf.lineno}: {text!r}")
    return found


def _client_makers(tree: ast.AST) -> list[str]:
    """Calls that make a Redis client or parse a Redis URL (``Redis(...)``, ``Sentinel(...)``,
    ``Redis.from_url``, ``master_for``, redis-py's ``parse_url``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value if isinstance(func, ast.Attribute) else None
            owner_name = getattr(owner, "id", getattr(owner, "attr", ""))
            if name in ("Redis", "StrictRedis", "Sentinel", "master_for", "parse_url") or (
                name == "from_url" and owner_name in ("Redis", "StrictRedis", "redis")
            ):
                found.append(f"line {node.lineno}: {name}")
    return found


def test_only_the_backend_switch_parses_the_store_url() -> None:
    """Issue 20 §4: the store URL is parsed in one place. No module but backends.py tests a
    store scheme; no module but the connector (store/redis/client.py) makes a Redis client, so
    every connection of a process comes from the one parsed target; only backends.py (and the
    Redis modules themselves) import a Redis module; no caller asks the backend's kind
    (``backend.shared``, ``signals is None``): it gets behaviour (``Signals`` on both,
    ``Backend.recover_orphans``)."""
    imports_redis = re.compile(
        r"^\s*(from|import) (redis\b|qwenserve\.(store\.redis|media\.redis_storage))", re.M
    )
    branches_on_kind = re.compile(r"\.(sole_user|shared)\b|signals is (not )?None")
    parsers, makers, users, branchers = {}, {}, [], []
    for path in SRC.rglob("*.py"):
        name = path.relative_to(SRC).as_posix()
        text = path.read_text()
        tree = ast.parse(text)
        if name != "backends.py" and (found := _scheme_tests(tree)):
            parsers[name] = found
        if name != "store/redis/client.py" and (found := _client_makers(tree)):
            makers[name] = found
        inside_redis = name.startswith("store/redis") or name == "media/redis_storage.py"
        if imports_redis.search(text) and not inside_redis and name != "backends.py":
            users.append(name)
        # Callers get behaviour, not a kind (runtime/'s `.shared` is the memory plan's own).
        asks_kind = branches_on_kind.search(text) and not name.startswith("runtime/")
        if asks_kind and name != "backends.py":
            branchers.append(name)
    assert parsers == {} and makers == {} and users == [] and branchers == []
    # The pin can fail: the code that config.py and redis_wakeup.py held before is caught.
    assert _scheme_tests(ast.parse('if url.startswith(("redis://", "rediss://")): pass'))
    assert _scheme_tests(ast.parse('p = Path(s.removeprefix("sqlite:///"))'))
    assert _client_makers(ast.parse("c = redis.Redis.from_url(url)"))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite", SqliteTarget()),
        ("sqlite:////srv/q.db", SqliteTarget(Path("/srv/q.db"))),
        ("redis://10.0.0.5:6380/2", RedisTarget(host="10.0.0.5", port=6380, db=2)),
        ("redis://h", RedisTarget(host="h", port=6379, db=0)),
        ("rediss://:p%40ss@h:1/3", RedisTarget(host="h", port=1, db=3, password="p@ss", tls=True)),
        ("redis://me:pw@h:1/0", RedisTarget(host="h", port=1, username="me", password="pw")),
        (
            "redis+sentinel://:pw@a:26379,b:26380,c/primary/4",
            RedisTarget(
                db=4,
                password="pw",
                sentinels=(("a", 26379), ("b", 26380), ("c", 26379)),
                service="primary",
            ),
        ),
        ("redis+sentinel://a:1/svc", RedisTarget(sentinels=(("a", 1),), service="svc")),
    ],
)
def test_store_urls_parse_into_typed_targets(url: str, expected: object) -> None:
    assert parse_store_url(url) == expected
    assert Settings(store=url).store == url  # config validates through the same parser


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgres://h/db", "store must be"),
        ("redis://", "no host"),
        ("redis://h:0/0", "bad port"),
        ("redis://h/zero", "must be a number"),
        ("redis://a,b/0", "several hosts"),
        ("redis://h/0?ssl=1", "query options"),
        ("redis+sentinel://a:1", "service"),
        ("sqlite:///", "store must be"),
    ],
)
def test_a_bad_store_url_is_refused_at_startup_saying_the_forms(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_store_url(url)
    with pytest.raises(ValidationError, match="redis\\+sentinel://"):
        Settings(store=url)


def test_a_password_never_shows_in_a_target_or_its_description() -> None:
    target = parse_store_url("redis+sentinel://:hunter2@a:1/svc/0")
    assert isinstance(target, RedisTarget) and target.password == "hunter2"
    assert "hunter2" not in repr(target) and "hunter2" not in target.describe()


def test_local_signals_reach_this_process_subscribers_until_closed() -> None:
    signals = LocalSignals()
    queued: list[str | None] = []
    ended: list[str | None] = []
    on_queued = signals.on_queued(queued.append)
    signals.on_job_end(ended.append)
    signals.publish_queued("qwen-image")
    signals.publish_job_end("job-1")
    signals.publish_cancel_requested("job-2")  # nobody listens: nothing happens
    on_queued.close()
    signals.publish_queued(None)
    assert (queued, ended) == (["qwen-image"], ["job-1"])


def test_a_restarted_embedded_node_requeues_what_its_predecessor_left_running(
    tmp_path: Path, clock: Clock
) -> None:
    settings = Settings(data_dir=tmp_path)
    backend = open_backend(settings)
    try:
        job = make_job(make_key(backend.store, clock), clock)
        backend.store.submit(job, rpm=0, now=clock.now)
        assert backend.store.claim("dead", slugs=None, lease_s=600, max_attempts=3, now=clock.now)
        assert backend.recover_orphans(now=clock.now, with_workers=False) == (0, 0)
        assert backend.recover_orphans(now=clock.now, with_workers=True) == (1, 0)
        again = backend.store.claim("new", slugs=None, lease_s=60, max_attempts=3, now=clock.now)
        assert [j.id for j in again] == [job.id]
    finally:
        backend.close()


@pytest.mark.redis
def test_a_shared_store_leaves_running_jobs_to_their_leases(redis_url: str, clock: Clock) -> None:
    backend = open_backend(Settings(store=redis_url))
    try:
        job = make_job(make_key(backend.store, clock), clock)
        backend.store.submit(job, rpm=0, now=clock.now)
        held = backend.store.claim(
            "alive", slugs=None, lease_s=600, max_attempts=3, now=clock.now, limit=100
        )
        assert job.id in [j.id for j in held]
        assert backend.recover_orphans(now=clock.now, with_workers=True) == (0, 0)
        assert not backend.store.claim("new", slugs=None, lease_s=60, max_attempts=3, now=clock.now)
    finally:
        backend.close()
