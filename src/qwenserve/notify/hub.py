"""Waking API handlers when a job ends, without polling the store in a tight loop.

Every ending is in the store's durable event log, and an ``EventFollower`` subscribed with
``on_event`` (``notify.follow_completions``) announces each one here, on both backends: ends by
workers in any process, give-ups after ``max_attempts`` inside a claim, cancels of queued jobs,
refunds at expiry. In-process workers also call ``notify`` the moment a job ends (the fast
path: no wait for the follower's next read). On Redis the done channel wakes the follower at
once (``store.redis_wakeup.RedisDoneWakeup``) and, after each (re)subscription, ``notify_all``.
Waiters also re-read the store every ``fallback_poll_s``: correctness never depends on a
notification arriving.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from qwenserve.jobs import JobEvent

_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Event]


class CompletionHub:
    """Thread-safe notifications from worker (or subscriber) threads to asyncio waiters.

    Args:
        fallback_poll_s: the longest a waiter sleeps before re-reading the store when nothing
            notifies it.
    """

    def __init__(self, fallback_poll_s: float = 0.25) -> None:
        self.fallback_poll_s = fallback_poll_s
        self._lock = threading.Lock()
        self._waiters: dict[str, set[_Waiter]] = defaultdict(set)

    def notify(self, job_id: str) -> None:
        """Wake every waiter of ``job_id``; callable from any thread."""
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        _wake(waiters)

    def on_event(self, event: JobEvent) -> None:
        """An ``EventFollower`` subscriber: wake the waiters of a job that ended."""
        if event.type.is_terminal:
            self.notify(event.job_id)

    def notify_all(self) -> None:
        """Wake every waiter of every job (each re-reads the store); callable from any thread.

        For when notifications may have been lost, e.g. after a pub/sub reconnect.
        """
        with self._lock:
            waiters = [waiter for group in self._waiters.values() for waiter in group]
        _wake(waiters)

    @contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """Register before reading the store, so a notification in between is not missed."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters[job_id].add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(entry)
                    if not waiters:
                        del self._waiters[job_id]

    async def sleep_until_notified(self, event: asyncio.Event, timeout_s: float) -> None:
        """Return when notified or after ``min(timeout_s, fallback_poll_s)``."""
        try:
            await asyncio.wait_for(event.wait(), timeout=min(timeout_s, self.fallback_poll_s))
        except TimeoutError:
            return
        event.clear()


def _wake(waiters: Iterable[_Waiter]) -> None:
    for loop, event in waiters:
        # A loop that has closed (shutdown) has nobody left to wake.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(event.set)
