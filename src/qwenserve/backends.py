"""The backend switch: the store URL is parsed here and nowhere else, and ``open_backend(settings)``
is the ONE place that asks "SQLite or Redis?".

``parse_store_url`` turns ``QWENSERVE_STORE`` into a typed target once:

* ``sqlite`` (the file in the data dir) or ``sqlite:///PATH``: ``SqliteTarget``;
* ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`` (``rediss://`` with TLS): one Redis server;
* ``redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT…]/SERVICE[/DB]``: the primary that the
  listed Sentinels watch under SERVICE (PASSWORD is the data nodes'; the Sentinels are asked
  without one). After a failover every client finds the new primary on its own.

Everything that differs between the embedded setup and the scaled-out one comes from here, as
one ``Backend``: the job store, the worker registry beside it, the media store, and the signals
that carry wake-ups. Callers get behaviour, never a kind to branch on: both backends give
``Signals`` with the same interface (in-process on SQLite, Redis pub/sub plus in-process on
Redis), and ``Backend.recover_orphans`` does what a restarted single node must (nothing where
other processes share the store). Every Redis client comes from one ``RedisConnector`` made from
the parsed target. Redis modules are imported only for a Redis URL, so the embedded setup never
loads them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlsplit

from qwenserve.config import Settings
from qwenserve.media.storage import (
    LocalMediaStore,
    MediaConfigError,
    MediaStore,
    PresigningMediaStore,
)
from qwenserve.store.base import Store
from qwenserve.store.history import HistoryPolicy
from qwenserve.store.redis_target import Address, RedisTarget
from qwenserve.store.workers import WorkerRegistry

if TYPE_CHECKING:
    from qwenserve.store.redis import RedisConnector

DEFAULT_REDIS_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
STORE_URL_FORMS = (
    "'sqlite', sqlite:///PATH, redis://[:PASSWORD@]HOST:PORT/DB (rediss:// for TLS) or "
    "redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE/DB"
)

WakeCallback = Callable[[str | None], None]
"""Called with a slug (queued) or a job id (ended, cancel asked), or None: look again."""


@dataclass(frozen=True)
class SqliteTarget:
    """The embedded store: one SQLite file (None: ``qwenserve.db`` in the data dir)."""

    path: Path | None = None

    def file_in(self, data_dir: Path) -> Path:
        return self.path if self.path is not None else data_dir / "qwenserve.db"

    def describe(self) -> str:
        """The target for logs and messages."""
        return f"sqlite:///{self.path}" if self.path is not None else "sqlite (in the data dir)"


StoreTarget = SqliteTarget | RedisTarget


def parse_store_url(url: str) -> StoreTarget:
    """The store URL as a typed target (the forms are in the module docstring).

    Raises:
        ValueError: not one of those forms, saying which are accepted.
    """
    if url == "sqlite":
        return SqliteTarget()
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return SqliteTarget(Path(url.removeprefix("sqlite:///")))
    parts = urlsplit(url)
    try:
        if parts.scheme in ("redis", "rediss"):
            return _redis_target(url, tls=parts.scheme == "rediss")
        if parts.scheme == "redis+sentinel":
            return _sentinel_target(url)
    except ValueError as error:
        raise ValueError(f"invalid store URL: {error}; expected {STORE_URL_FORMS}") from None
    raise ValueError(f"store must be {STORE_URL_FORMS}")


def _split(url: str) -> tuple[str | None, str | None, str, str]:
    """(user, password, hosts, path) of ``scheme://[user[:password]@]hosts[/path]``."""
    rest = url.split("://", 1)[1]
    if "?" in rest or "#" in rest:
        raise ValueError("query options are not supported")
    hosts, _, path = rest.partition("/")
    user = password = None
    if "@" in hosts:
        credentials, hosts = hosts.rsplit("@", 1)
        name, colon, secret = credentials.partition(":")
        user = unquote(name) or None
        password = unquote(secret) if colon else unquote(name) or None
        if not colon:  # redis://PASSWORD@HOST, as redis-py reads it
            user = None
    if not hosts:
        raise ValueError("no host")
    return user, password, hosts, path


def _address(text: str, default_port: int) -> Address:
    host, colon, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    host = host if colon else text
    if not host or not (port.isdigit() if colon else True):
        raise ValueError(f"bad address {text!r}")
    number = int(port) if colon else default_port
    if not 0 < number < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, number


def _db(text: str) -> int:
    if text == "":
        return 0
    if not text.isdigit():
        raise ValueError(f"the database must be a number, not {text!r}")
    return int(text)


def _redis_target(url: str, *, tls: bool) -> RedisTarget:
    user, password, hosts, path = _split(url)
    if "," in hosts:
        raise ValueError("several hosts need redis+sentinel://")
    host, port = _address(hosts, DEFAULT_REDIS_PORT)
    return RedisTarget(
        host=host, port=port, db=_db(path), username=user, password=password, tls=tls
    )


def _sentinel_target(url: str) -> RedisTarget:
    user, password, hosts, path = _split(url)
    service, _, db = path.partition("/")
    if not service:
        raise ValueError("no Sentinel service name")
    sentinels = tuple(_address(node, DEFAULT_SENTINEL_PORT) for node in hosts.split(","))
    return RedisTarget(
        db=_db(db.rstrip("/")),
        username=user,
        password=password,
        sentinels=sentinels,
        service=unquote(service),
    )


# --- signals ---------------------------------------------------------------------------------


class Subscriber(Protocol):
    """A started subscription; ``close()`` it on shutdown."""

    def close(self) -> None: ...


class Signals(Protocol):
    """Wake-ups between the parts of a deployment, the same on every backend.

    Each ``on_*`` call returns a started subscription. ``on_wake`` runs on the publisher's
    thread (in-process) or a subscriber thread (Redis) and should be quick.
    """

    def on_queued(self, on_wake: WakeCallback) -> Subscriber:
        """``on_wake(slug)`` when a job of ``slug`` becomes claimable (None: look again)."""
        ...

    def on_job_end(self, on_wake: WakeCallback) -> Subscriber:
        """``on_wake(job_id)`` when a job ends (None: some ends may have been missed)."""
        ...

    def on_cancel_requested(self, on_wake: WakeCallback) -> Subscriber:
        """``on_wake(job_id)`` when an owner asks to stop a running job (None: look again)."""
        ...

    def publish_queued(self, slug: str | None) -> None:
        """Tell this process's ``on_queued`` subscribers (a submit made here)."""
        ...

    def publish_job_end(self, job_id: str) -> None:
        """Tell this process's ``on_job_end`` subscribers (a job ended here)."""
        ...

    def publish_cancel_requested(self, job_id: str) -> None:
        """Tell this process's ``on_cancel_requested`` subscribers (a cancel asked here)."""
        ...


@dataclass
class _Subscription:
    bus: LocalSignals
    topic: str
    on_wake: WakeCallback

    def close(self) -> None:
        self.bus._drop(self)


@dataclass
class LocalSignals:
    """In-process signals: what this process publishes reaches its own subscribers at once.

    The embedded store's only user is this process, so this is all it needs. The Redis
    backend's ``RedisSignals`` extends it to every process sharing the store.
    """

    _subscriptions: list[_Subscription] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _subscribe(self, topic: str, on_wake: WakeCallback) -> _Subscription:
        subscription = _Subscription(self, topic, on_wake)
        with self._lock:
            self._subscriptions.append(subscription)
        return subscription

    def _drop(self, subscription: _Subscription) -> None:
        with self._lock:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)

    def _publish(self, topic: str, message: str | None) -> None:
        with self._lock:
            targets = [s.on_wake for s in self._subscriptions if s.topic == topic]
        for on_wake in targets:
            on_wake(message)

    def on_queued(self, on_wake: WakeCallback) -> Subscriber:
        return self._subscribe("queued", on_wake)

    def on_job_end(self, on_wake: WakeCallback) -> Subscriber:
        return self._subscribe("ended", on_wake)

    def on_cancel_requested(self, on_wake: WakeCallback) -> Subscriber:
        return self._subscribe("cancel", on_wake)

    def publish_queued(self, slug: str | None) -> None:
        self._publish("queued", slug)

    def publish_job_end(self, job_id: str) -> None:
        self._publish("ended", job_id)

    def publish_cancel_requested(self, job_id: str) -> None:
        self._publish("cancel", job_id)


class RedisSignals(LocalSignals):
    """The Redis store's pub/sub channels (its Lua scripts PUBLISH), as subscribers on their
    own threads, plus the in-process delivery of ``LocalSignals``. Polling stays the fallback
    while Redis is unreachable (the subscribers reconnect with backoff, through the connector,
    so after a Sentinel failover they follow the new primary). Each ``on_*`` returns the
    started Redis subscriber, whose ``close()`` ends its in-process twin too."""

    def __init__(self, connector: RedisConnector) -> None:
        super().__init__()
        self.connector = connector

    def on_queued(self, on_wake: WakeCallback) -> Subscriber:
        from qwenserve.store.redis_wakeup import RedisWakeup

        local = super().on_queued(on_wake)
        return RedisWakeup(self.connector, on_wake=on_wake, on_close=local.close).start()

    def on_job_end(self, on_wake: WakeCallback) -> Subscriber:
        from qwenserve.store.redis_wakeup import RedisDoneWakeup

        local = super().on_job_end(on_wake)
        return RedisDoneWakeup(self.connector, on_wake=on_wake, on_close=local.close).start()

    def on_cancel_requested(self, on_wake: WakeCallback) -> Subscriber:
        from qwenserve.store.redis_wakeup import RedisCancelWakeup

        local = super().on_cancel_requested(on_wake)
        return RedisCancelWakeup(self.connector, on_wake=on_wake, on_close=local.close).start()


# --- the backend -----------------------------------------------------------------------------


@dataclass
class Backend:
    """The parts of one backend, opened together so they always agree on where data lives."""

    store: Store
    registry: WorkerRegistry
    media: MediaStore
    signals: Signals
    """Wake-ups: in-process on SQLite; on Redis, across processes too."""
    sole_user: bool = False
    """This process is the store's only user (the embedded SQLite store): whatever was left
    mid-flight belongs to a predecessor that died. Read through ``recover_orphans``."""
    connector: RedisConnector | None = None
    """The Redis connection factory every Redis part came from (None on SQLite)."""

    def recover_orphans(self, *, now: float, with_workers: bool) -> tuple[int, int]:
        """What a restarted single node must do at once: requeue the jobs a dead predecessor
        left PROCESSING (when this node runs workers; else they wait for their lease) and
        resend its webhook deliveries left mid-send. Where other processes share the store
        (Redis) those may be alive elsewhere: nothing is touched, leases decide.

        Returns:
            (jobs requeued, webhook deliveries released).
        """
        if not self.sole_user:
            return 0, 0
        orphans = 0
        if with_workers:
            orphans = self.store.expire_leases(now=now)
            for dead in self.registry.alive(now=now):
                self.registry.remove(dead.worker_id)
        return orphans, self.store.release_webhook_leases(now=now)

    def close(self) -> None:
        """Close every part that holds a connection (idempotent as the parts are)."""
        self.store.close()
        for part in (self.registry, self.media, self.connector):
            close: Callable[[], None] | None = getattr(part, "close", None)
            if close is not None:
                close()


def history_policy(settings: Settings) -> HistoryPolicy:
    """What the store keeps of requests after their results expire."""
    return HistoryPolicy(ttl_s=settings.history_ttl_s, keep_prompts=settings.history_keep_prompts)


def sqlite_file(settings: Settings) -> Path:
    """The SQLite file ``settings`` name (the data dir's default unless ``sqlite:///PATH``)."""
    target = parse_store_url(settings.store)
    sqlite = target if isinstance(target, SqliteTarget) else SqliteTarget()
    return sqlite.file_in(settings.data_dir)


def open_media(settings: Settings, *, beside: Callable[[], MediaStore]) -> MediaStore:
    """The media store: the bucket ``QWENSERVE_MEDIA=s3://…`` names (checked now: credentials,
    bucket, write access), else ``beside()``, the store's own (a local folder beside SQLite,
    Redis beside Redis). aiobotocore is imported only for a bucket.

    Raises:
        MediaConfigError: the bucket cannot be used, or ``media_urls=presigned`` without one.
    """
    if settings.media is None:
        media = beside()
    else:
        from qwenserve.media.s3 import S3MediaStore

        media = S3MediaStore.open(
            settings.media,
            ttl_s=settings.result_ttl_s,
            region=settings.media_region,
            endpoint_url=settings.media_endpoint_url,
        )
    if settings.media_urls == "presigned" and not isinstance(media, PresigningMediaStore):
        raise MediaConfigError(
            "media_urls=presigned needs media in S3: set QWENSERVE_MEDIA=s3://BUCKET/PREFIX"
        )
    return media


def open_backend(settings: Settings) -> Backend:
    """The backend ``settings.store`` names (see the module docstring); its media store is
    ``open_media``'s.

    Raises:
        ValueError: a store URL of none of the accepted forms.
        MediaConfigError: ``QWENSERVE_MEDIA`` names a bucket that cannot be used.
    """
    target = parse_store_url(settings.store)
    if isinstance(target, RedisTarget):
        from qwenserve.media.redis_storage import RedisMediaStore
        from qwenserve.store.redis import RedisConnector, RedisStore, RedisWorkerRegistry

        connector = RedisConnector(target)
        return Backend(
            store=RedisStore(
                connector.client(),
                history_policy=history_policy(settings),
                min_replicas=settings.redis_min_replicas,
                replica_wait_s=settings.redis_replica_wait_s,
            ),
            registry=RedisWorkerRegistry(connector.client()),
            media=open_media(
                settings,
                beside=lambda: RedisMediaStore(
                    connector.client(decode_responses=False),
                    min_replicas=settings.redis_min_replicas,
                    replica_wait_s=settings.redis_replica_wait_s,
                ),
            ),
            signals=RedisSignals(connector),
            connector=connector,
        )
    from qwenserve.store.sqlite import SqliteStore
    from qwenserve.store.workers import SqliteWorkerRegistry

    path = target.file_in(settings.data_dir)
    return Backend(
        store=SqliteStore(path, history_policy=history_policy(settings)),
        registry=SqliteWorkerRegistry(path),
        media=open_media(settings, beside=lambda: LocalMediaStore(settings.media_dir)),
        signals=LocalSignals(),
        sole_user=True,
    )


__all__ = [
    "Backend",
    "LocalSignals",
    "RedisSignals",
    "Signals",
    "SqliteTarget",
    "StoreTarget",
    "Subscriber",
    "WakeCallback",
    "open_backend",
    "open_media",
    "parse_store_url",
    "sqlite_file",
]
