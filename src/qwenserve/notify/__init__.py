"""Consumers of the store's durable job event log: the completion hub that wakes POST /v1
waiters (``hub.py``), fed by one ``EventFollower`` (``follower.py``) that live event streams
and webhooks can subscribe to as well, and ``cancel_requests``, which hands each cancel
request to the workers of the process (the one holding the job stops it at its next step)."""

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
    job that ends, on any node, in any way (``close()`` it on shutdown)."""
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
