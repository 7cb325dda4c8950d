"""Following the store's durable job event log: one reader thread, many subscribers.

Every transition of a job is appended to the log in the same atomic step as the transition
(``Store.events``), so a reader that keeps its place misses nothing, whichever process or
backend made the change, and a consumer that stored its place resumes from it after a restart.
``EventFollower`` reads the log in order every ``poll_s`` (or at once when ``poke``d, e.g. by
the Redis done channel) and hands each event to every subscriber. It is the ONE reader of the
log in a process: the completion hub, the endings handler (``endings.py``), the webhook
dispatcher, the SSE fan-out (``fanout.py``), the ETA pace and the /metrics counters all take
their events from the same read, so a process reads the log once per poll however many
connections and consumers it has. A consumer that needs the log read up to now (a /metrics
scrape, an ETA) asks for it with ``catch_up``: that read is the follower's own, shared, and
skipped when one just happened::

    follower = EventFollower(store, poll_s=0.2)
    unsubscribe = follower.subscribe(hub.on_event)
    follower.start()
    ...
    follower.close()
"""

from __future__ import annotations

import logging
import threading
import time
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
            when it is made: only what happens from then on.
    """

    def __init__(
        self, store: Store, *, poll_s: float = DEFAULT_POLL_S, after: str | None = None
    ) -> None:
        self.store = store
        self.poll_s = poll_s
        self._position = after
        self._placed = after is not None
        self._subscribers: list[EventCallback] = []
        self._lock = threading.Lock()
        self._reading = threading.Lock()  # one read at a time: the thread's or a catch_up's
        self._read_at: float | None = None
        self.reads = 0
        """Store reads of the log made so far (each ``Store.events`` call)."""
        self._place()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="qwenserve-events", daemon=True)

    @property
    def position(self) -> str | None:
        """The id of the last event handed out (where a restart should resume)."""
        return self._position

    def subscribe(self, callback: EventCallback, *, history: int = 0) -> Callable[[], None]:
        """Call ``callback`` with every event from the next read on; returns the unsubscribe.

        With ``history`` > 0, ``callback`` alone is first handed what the log retained up to
        this reader's position (at most ``history`` events, oldest first: the store reads the
        log forward only), so a consumer that learns from the past (the ETA pace) does not
        start blank on a restarted node. That read is this reader's own, one bounded read at
        subscription (counted in ``reads``), not a second cursor; it is best effort (a store
        that is away now: logged, and the callback starts from now).
        """
        with self._reading:  # no read of the reader's own between the history and the live
            if history > 0:
                self._replay(callback, history)
            with self._lock:
                self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def _place(self) -> None:
        """Where "from now on" starts: the log's newest event (retried at the next read when
        the store is away now)."""
        if self._placed:
            return
        try:
            self._position = self.store.last_event_id()
        except Exception as error:
            log.warning("event log: cannot read its end yet (%s)", error)
            return
        self._placed = True

    def _replay(self, callback: EventCallback, limit: int) -> None:
        """Hand ``callback`` the log from its start up to the position, at most ``limit``."""
        self._place()
        end = self._position
        if end is None:  # an empty log, or a store away now
            return
        after: str | None = None
        handed = 0
        try:
            while handed < limit:
                self.reads += 1
                events = self.store.events(after=after, limit=min(READ_LIMIT, limit - handed))
                for event in events:
                    try:
                        callback(event)
                    except Exception:
                        log.exception("event log history: subscriber failed on %s", event.type)
                    handed += 1
                    if event.id == end:
                        return
                if not events:
                    return
                after = events[-1].id
        except Exception as error:  # the store is away: the subscriber starts from now
            log.warning("event log: could not read its history (%s)", error)

    @property
    def running(self) -> bool:
        """Whether its own thread reads the log (else only ``catch_up`` does)."""
        return self._thread.is_alive()

    def start(self) -> Self:
        """Start reading on its own thread (from where it was placed); returns self. A closed
        reader starts again on a fresh thread (an app's lifespan may run more than once)."""
        self._place()
        if self._thread.is_alive():
            return self
        if self._thread.ident is not None:  # ran before, then closed
            self._closed.clear()
            self._wake.clear()
            self._thread = threading.Thread(target=self._run, name="qwenserve-events", daemon=True)
        self._thread.start()
        return self

    def catch_up(self, max_age_s: float = 0.0) -> int:
        """Read the log up to now unless a read finished within ``max_age_s`` (then nothing);
        returns how many events were handed out. For a consumer that must be current (a scrape,
        an ETA); concurrent callers share one read. Raises what the store raises."""
        with self._reading:
            if self._read_at is not None and time.monotonic() - self._read_at < max_age_s:
                return 0
            return self._read_locked()

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
        with self._reading:
            return self._read_locked()

    def _read_locked(self) -> int:
        self._place()
        if not self._placed:
            return 0
        handed = 0
        while True:
            try:
                self.reads += 1
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
                self._read_at = time.monotonic()
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
