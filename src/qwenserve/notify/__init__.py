"""The store's durable job event log, read ONCE per process, and what follows from it.

``EventFollower`` (``follower.py``) is the process's one reader: it pages through the log with
the only cursor and hands every event to its subscribers, so nothing else reads the log:

* ``CompletionHub`` (``hub.py``) wakes the POST /v1 waiters (and OpenAI streams) of a job that
  ended;
* ``Endings`` (``endings.py``) does everything an ending needs, for every kind of ending
  (stored inline inputs deleted, ...; the cost was settled in the ending's own store step), once
  per process; a new after-job behaviour is one ``Endings.subscribe``;
* ``JobFeeds`` (``fanout.py``) hands a job's transitions to its live SSE streams: one read for
  all the connections of the process;
* the ``WebhookDispatcher`` (``webhooks.py``) turns endings into deliveries (its persisted cursor
  is read only at start and after a failed round, for durability), bodies rendered from the
  job by ``bodies.py``, the same builder the API's polls use;
* the API's ETA pace (``api/eta.py``) and /metrics job counters (``api/metrics.py``);
* ``cancel_requests`` hands each cancel request to the workers of the process (the one holding
  the job stops it at its next step).

Consumers that must be current (a scrape) ask the reader to ``catch_up``; it stays one read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from qwenserve.jobs import JobEvent, JobEventType
from qwenserve.notify.follower import DEFAULT_POLL_S, EventCallback, EventFollower
from qwenserve.notify.hub import CompletionHub

if TYPE_CHECKING:
    from qwenserve.store.base import Store

__all__ = [
    "CompletionHub",
    "EventCallback",
    "EventFollower",
    "cancel_requests",
    "follow_completions",
]


def follow_completions(
    store: Store, hub: CompletionHub, *, poll_s: float = DEFAULT_POLL_S
) -> EventFollower:
    """A started follower of ``store``'s log from now on that wakes ``hub``'s waiters for every
    job that ends, on any node, in any way (``close()`` it on shutdown). For a process with no
    API; the API's ``Services`` subscribes its hub to its own reader."""
    follower = EventFollower(store, poll_s=poll_s)
    follower.subscribe(hub.on_event)
    return follower.start()


def cancel_requests(on_cancel: Callable[[str], object]) -> EventCallback:
    """An ``EventFollower`` subscriber that calls ``on_cancel(job_id)`` for every cancel request
    logged for a running job, on any node (``JobControl.cancel_requested`` of each worker of
    this process: the one holding the job heartbeats at once and stops it at its next step)."""

    def on_event(event: JobEvent) -> None:
        if event.type is JobEventType.CANCEL_REQUESTED:
            on_cancel(event.job_id)

    return on_event
