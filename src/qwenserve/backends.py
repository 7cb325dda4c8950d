"""The backend switch: ``open_backend(settings)`` is the ONE place that asks "SQLite or Redis?".

Everything that differs between the embedded setup and the scaled-out one comes from here, as
one ``Backend``: the job store, the worker registry beside it, the media store, and the signals
that carry wake-ups between processes. ``sqlite`` (or ``sqlite:///PATH``) gives the SQLite file
in the data dir, local media files and no signals (one process holds the store and wakes its
workers and waiters in-process); ``redis://`` or ``rediss://`` gives Redis for all three parts
plus its pub/sub channels. Redis modules are imported only then, so the embedded setup never
loads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwenserve.config import Settings
from qwenserve.media.storage import LocalMediaStore, MediaStore
from qwenserve.store.base import Store
from qwenserve.store.history import HistoryPolicy
from qwenserve.store.workers import WorkerRegistry

if TYPE_CHECKING:
    from qwenserve.store.redis_wakeup import RedisCancelWakeup, RedisDoneWakeup, RedisWakeup

WakeCallback = Callable[[str | None], None]
"""Called on a subscriber thread with a slug (queued) or a job id (ended), or None: look again."""


@dataclass(frozen=True)
class RedisSignals:
    """The Redis store's pub/sub channels, as subscribers that run on their own threads.

    Each method returns a started subscriber; ``close()`` it on shutdown. Polling stays the
    fallback while Redis is unreachable (the subscribers reconnect with backoff).
    """

    url: str

    def on_queued(self, on_wake: WakeCallback) -> RedisWakeup:
        """Call ``on_wake(slug)`` whenever any node makes a job of ``slug`` claimable."""
        from qwenserve.store.redis_wakeup import RedisWakeup

        return RedisWakeup(self.url, on_wake=on_wake).start()

    def on_job_end(self, on_wake: WakeCallback) -> RedisDoneWakeup:
        """Call ``on_wake(job_id)`` whenever a job ends on any node, and ``on_wake(None)`` after
        each (re)subscription, since ends published meanwhile were missed."""
        from qwenserve.store.redis_wakeup import RedisDoneWakeup

        return RedisDoneWakeup(self.url, on_wake=on_wake).start()

    def on_cancel_requested(self, on_wake: WakeCallback) -> RedisCancelWakeup:
        """Call ``on_wake(job_id)`` whenever an owner asks to cancel a running job on any node,
        and ``on_wake(None)`` after each (re)subscription (requests meanwhile were missed)."""
        from qwenserve.store.redis_wakeup import RedisCancelWakeup

        return RedisCancelWakeup(self.url, on_wake=on_wake).start()


@dataclass
class Backend:
    """The parts of one backend, opened together so they always agree on where data lives."""

    store: Store
    registry: WorkerRegistry
    media: MediaStore
    signals: RedisSignals | None
    """Wake-ups across processes; None on SQLite, where submits and ends wake in-process."""
    shared: bool
    """Other processes may use this store (Redis): a PROCESSING job may belong to a live worker
    elsewhere. False for the embedded store, whose only user is this process."""

    def close(self) -> None:
        """Close every part that holds a connection (idempotent as the parts are)."""
        self.store.close()
        for part in (self.registry, self.media):
            close: Callable[[], None] | None = getattr(part, "close", None)
            if close is not None:
                close()


def history_policy(settings: Settings) -> HistoryPolicy:
    """What the store keeps of requests after their results expire."""
    return HistoryPolicy(ttl_s=settings.history_ttl_s, keep_prompts=settings.history_keep_prompts)


def open_backend(settings: Settings) -> Backend:
    """The backend ``settings.store`` names (see the module docstring).

    Raises:
        ValueError: a Redis URL that the client cannot parse.
    """
    if _is_redis(settings.store):
        from qwenserve.media.redis_storage import RedisMediaStore
        from qwenserve.store.redis import RedisStore, RedisWorkerRegistry

        return Backend(
            store=RedisStore.from_url(settings.store, history_policy=history_policy(settings)),
            registry=RedisWorkerRegistry.from_url(settings.store),
            media=RedisMediaStore.from_url(settings.store),
            signals=RedisSignals(settings.store),
            shared=True,
        )
    from qwenserve.store.sqlite import SqliteStore
    from qwenserve.store.workers import SqliteWorkerRegistry

    return Backend(
        store=SqliteStore(settings.sqlite_path, history_policy=history_policy(settings)),
        registry=SqliteWorkerRegistry(settings.sqlite_path),
        media=LocalMediaStore(settings.media_dir),
        signals=None,
        shared=False,
    )


def _is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://"))


__all__ = ["Backend", "RedisSignals", "WakeCallback", "open_backend"]
