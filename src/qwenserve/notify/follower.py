"""Following the store's durable job event log: one reader thread, many subscribers.

Every transition of a job is appended to the log in the same atomic step as the transition
(``Store.events``), so a reader that keeps its place misses nothing, whichever process or
backend made the change, and a consumer that stored its place resumes from it after a restart.
``EventFollower`` reads the log in order every ``poll_s`` (or at once when ``poke``d, e.g. by
the Redis done channel) and hands each event to every subscriber: the completion hub today,
live event streams and webhooks tomorrow, all on the same read::

    follower = EventFollower(store, poll_s=0.2).start()
    unsubscribe = follower.subscribe(hub.on_event)
    ...
    follower.close()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Self

from qwenserve.errors import InvalidRequest
from qwenserve.jobs import JobEvent

if TYPE_CHECKING:
    from qwenserve.store.base import Store

log = logging.getLogger("qwenserve")

EventCallback = Callable[[JobEvent], None]
"""Called on the follower thread with each event, in log order; it should be quick."""

DEFAULT_POLL_S = 0.2
READ_LIMIT = 200
"""Events per store read; a longer backlog is read in several."""
ERROR_BACKOFF_S = 1.0


class EventFollower:
    """Reads ``store``'s event log from a position and calls every subscriber per event.

    Args:
        store: whose log to follow.
        poll_s: seconds between reads when nothing pokes it.
        after: the event id to resume after; None (the default) starts from the newest event
            at ``start()``: only what happens from then on.
    """

    def __init__(
        self, store: Store, *, poll_s: float = DEFAULT_POLL_S, after: str | None = None
    ) -> None:
        self.store = store
        self.poll_s = poll_s
        self._position = after
        self._resume = after is not None
        self._subscribers: list[EventCallback] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="qwenserve-events", daemon=True)

    @property
    def position(self) -> str | None:
        """The id of the last event handed out (where a restart should resume)."""
        return self._position

    def subscribe(self, callback: EventCallback) -> Callable[[], None]:
        """Call ``callback`` with every event from the next read on; returns the unsubscribe."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def start(self) -> Self:
        """Note where the log ends now (unless resuming) and start reading; returns self."""
        if not self._resume:
            self._position = self.store.last_event_id()
        self._thread.start()
        return self

    def poke(self) -> None:
        """Read now rather than at the next poll (something was just appended)."""
        self._wake.set()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def read(self) -> int:
        """Hand every event after the position to the subscribers; returns how many."""
        handed = 0
        while True:
            try:
                events = self.store.events(after=self._position, limit=READ_LIMIT)
            except InvalidRequest:  # not this store's id (the store was swapped): from now on
                log.warning("event log: position %r unknown; following from now", self._position)
                self._position = self.store.last_event_id()
                return handed
            for event in events:
                self._hand_out(event)
                self._position = event.id
            handed += len(events)
            if len(events) < READ_LIMIT:
                return handed

    def _hand_out(self, event: JobEvent) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:
                log.exception("event log subscriber failed on %s %s", event.type, event.job_id)

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self.read()
                if self._failing:
                    log.info("event log: reading again")
                self._failing = False
            except Exception as error:  # the store is away: resume from the same place later
                if not self._failing:
                    log.warning("event log: read failed (%s); retrying", error)
                self._failing = True
                self._closed.wait(ERROR_BACKOFF_S)
            self._wake.wait(self.poll_s)
            self._wake.clear()
