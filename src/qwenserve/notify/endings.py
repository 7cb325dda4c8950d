"""What follows a job's ending, for every kind of ending, in one place.

Five callers end jobs: a submit the content policy refused, an owner's cancel, a worker's
finisher (completed, failed, cancelled), a claim that gives a job up after ``max_attempts`` or
finds its start deadline passed, and the purge loop (expired before it finished). Whoever made
it, the ending is one atomic store step that settles its cost (the refund, or the charge kept)
and appends a ``completed``/``failed`` event, and ``Endings`` does everything that follows, once
per process per ending:

* it is a subscriber of the process's one event-log reader (``EventFollower``), so it sees every
  ending made anywhere (another process, another node, a give-up inside someone's claim);
* a caller that made an ending may hand over the event its transition returned, with the job it
  holds (``handle``): the same handlers run at once, and the reader's later copy is skipped.

Each ending's handlers get an ``Ending`` (the event and the job as the store has it, None once
it expired). The built-in one deletes the job's stored inline inputs (``media/inline.py``;
nothing else would until the result TTL) and logs the ending; the composition root adds the
notifications (the completion hub, the webhook dispatcher). A new after-job behaviour is one
more ``subscribe``. Handlers must be idempotent: with several processes on one store, each runs
them for every ending (deleting a deleted input is a no-op; webhooks are claimed under leases).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwenserve.jobs import Job, JobEvent
from qwenserve.media.inline import stored_input_ids

if TYPE_CHECKING:
    from qwenserve.media.storage import MediaStore
    from qwenserve.store.base import Store

log = logging.getLogger("qwenserve")

REMEMBERED_ENDINGS = 10_000
"""Ending event ids kept to run each ending's handlers once per process."""


@dataclass(frozen=True)
class Ending:
    """One job's ending: its logged event, and the job as the store had it (None: gone)."""

    event: JobEvent
    job: Job | None


EndingHandler = Callable[[Ending], None]


class Endings:
    """Runs every ending handler once per ending (see the module docstring).

    Args:
        store: where a job is read when the event comes from the log alone.
        media: where its stored inline inputs are deleted.
        clock: Unix seconds (the store's reads take ``now``).
    """

    def __init__(self, store: Store, media: MediaStore, *, clock: Callable[[], float]) -> None:
        self.store = store
        self.media = media
        self.clock = clock
        self._handlers: list[EndingHandler] = [self._forget_inputs, _log_ending]
        self._lock = threading.Lock()
        self._handled: OrderedDict[str, None] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None

    def subscribe(self, handler: EndingHandler) -> Callable[[], None]:
        """Call ``handler`` for every ending from now on; returns the unsubscribe."""
        with self._lock:
            self._handlers.append(handler)

        def unsubscribe() -> None:
            with self._lock:
                if handler in self._handlers:
                    self._handlers.remove(handler)

        return unsubscribe

    def on_event(self, event: JobEvent) -> None:
        """The event-log reader's subscriber: an ending's handlers run on this object's own
        thread (the reader goes on at once), the job read from the store there."""
        if not event.type.is_terminal or self._seen(event.id):
            return
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="qwenserve-endings")
            pool = self._pool
        pool.submit(self._from_log, event)

    def handle(self, events: Iterable[JobEvent], *held: Job) -> None:
        """A caller's own transition returned ``events``: run the handlers of its endings now,
        on this thread, each with its job from ``held`` (what the caller holds) or else as
        stored."""
        jobs = {job.id: job for job in held}
        for event in events:
            if not event.type.is_terminal or not self._claim(event.id):
                continue
            job = jobs.get(event.job_id)
            self._run(Ending(event, job if job is not None else self._read(event)))

    def close(self) -> None:
        """Finish the endings handed over so far."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _from_log(self, event: JobEvent) -> None:
        if self._claim(event.id):
            self._run(Ending(event, self._read(event)))

    def _seen(self, event_id: str) -> bool:
        with self._lock:
            return event_id in self._handled

    def _claim(self, event_id: str) -> bool:
        """Whether this call is the first to handle the ending ``event_id`` here."""
        with self._lock:
            if event_id in self._handled:
                return False
            self._handled[event_id] = None
            while len(self._handled) > REMEMBERED_ENDINGS:
                self._handled.popitem(last=False)
            return True

    def _read(self, event: JobEvent) -> Job | None:
        try:
            return self.store.get_job(event.job_id, now=self.clock())
        except Exception:
            log.warning("job %s: could not read it after its ending", event.job_id, exc_info=True)
            return None

    def _run(self, ending: Ending) -> None:
        with self._lock:
            handlers = list(self._handlers)
        for handler in handlers:
            try:
                handler(ending)
            except Exception:
                log.exception("job %s: an ending handler failed", ending.event.job_id)

    def _forget_inputs(self, ending: Ending) -> None:
        """Delete the inline inputs the API stored for the job (they would otherwise stay until
        the result TTL); a job already gone took them with it (same expiry)."""
        if ending.job is None:
            return
        for media_id in stored_input_ids(ending.job.request):
            self.media.delete(media_id)


def _log_ending(ending: Ending) -> None:
    event = ending.event
    if event.type.value == "completed":
        log.debug("job %s ended: completed", event.job_id)
    else:
        log.debug("job %s ended: %s (%s)", event.job_id, event.error_kind, event.error)
