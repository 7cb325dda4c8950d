"""Consumers of the store's durable job event log: the completion hub that wakes POST /v1
waiters (``hub.py``), fed by one ``EventFollower`` (``follower.py``) that live event streams
and webhooks can subscribe to as well."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwenserve.notify.follower import DEFAULT_POLL_S, EventCallback, EventFollower
from qwenserve.notify.hub import CompletionHub

if TYPE_CHECKING:
    from qwenserve.store.base import Store

__all__ = ["CompletionHub", "EventCallback", "EventFollower", "follow_completions"]


def follow_completions(
    store: Store, hub: CompletionHub, *, poll_s: float = DEFAULT_POLL_S
) -> EventFollower:
    """A started follower of ``store``'s log from now on that wakes ``hub``'s waiters for every
    job that ends, on any node, in any way (``close()`` it on shutdown)."""
    follower = EventFollower(store, poll_s=poll_s)
    follower.subscribe(hub.on_event)
    return follower.start()
