"""Waking API handlers when a job ends, without polling the store in a tight loop.

In-process workers call ``notify`` the moment a job ends; handlers waiting on that job wake at
once. Workers in other processes (scale-out) cannot reach this hub, so waiters also re-read the
store every ``fallback_poll_s``: correctness never depends on a notification arriving.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class CompletionHub:
    """Thread-safe notifications from worker threads to asyncio waiters."""

    def __init__(self, fallback_poll_s: float = 0.25) -> None:
        self.fallback_poll_s = fallback_poll_s
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = (
            defaultdict(set)
        )

    def notify(self, job_id: str) -> None:
        """Wake every waiter of ``job_id``; callable from any thread."""
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

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
