"""One job's logged transitions, handed to every live stream watching it, from the process's one
read of the event log.

An SSE connection (``GET /v2/requests/{id}/events``) does not read the log itself: it
``watch``es its job here, and the process's ``EventFollower`` (subscribed with ``on_event``)
puts each event of that job on the connection's queue, on the connection's own event loop. So
N open streams cost one log read per poll, not N.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from qwenserve.jobs import JobEvent

_Watcher = tuple[asyncio.AbstractEventLoop, "asyncio.Queue[JobEvent]"]


class JobFeeds:
    """Per-job queues of logged events, fed from the event-log reader's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watchers: dict[str, set[_Watcher]] = defaultdict(set)

    def on_event(self, event: JobEvent) -> None:
        """An ``EventFollower`` subscriber: hand ``event`` to its job's watchers."""
        with self._lock:
            watchers = list(self._watchers.get(event.job_id, ()))
        for loop, queue in watchers:
            with contextlib.suppress(RuntimeError):  # a closed loop has nobody left to tell
                loop.call_soon_threadsafe(queue.put_nowait, event)

    @property
    def watched(self) -> int:
        """Jobs watched now (for tests and gauges)."""
        with self._lock:
            return len(self._watchers)

    @contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Queue[JobEvent]]:
        """A queue of ``job_id``'s events from now on. Enter it before reading the job's
        backlog, so an event logged in between is on the queue (callers drop repeats by id)."""
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        entry = (asyncio.get_running_loop(), queue)
        with self._lock:
            self._watchers[job_id].add(entry)
        try:
            yield queue
        finally:
            with self._lock:
                watchers = self._watchers.get(job_id)
                if watchers is not None:
                    watchers.discard(entry)
                    if not watchers:
                        del self._watchers[job_id]
