"""Waking idle workers the moment a job becomes claimable on the Redis store (pub/sub).

The store's submit and release scripts PUBLISH the job's slug on the namespace's ``wake`` channel
(``RedisKeys.wake``). ``RedisWakeup`` is the listening end: a daemon thread with its own
connection, subscribed to that channel, that calls ``on_wake(slug)`` for every message. Wired to
``WorkerRunner.wake`` it turns "claim at the next poll" into "claim now" for workers in other
processes, the way an in-process submit already wakes the embedded worker::

    wakeup = RedisWakeup(connector, on_wake=lambda slug: runner.wake()).start()
    ...
    wakeup.close()

Pub/sub is fire-and-forget: a message published while the subscriber is disconnected is lost.
So workers keep polling (slowly) as the fallback, and each time Redis confirms a subscription
(the first, and after every reconnect) the subscriber calls ``on_wake(None)`` once: "anything
may have arrived while I was not listening".

``RedisDoneWakeup`` is the same subscriber on the ``done`` channel (``RedisKeys.done``), where
the store's scripts publish the id of every job that ends (completed, failed, refunded at
expiry). API nodes wire it to ``CompletionHub.notify``, so a POST /v1 answered by a worker in
another process returns as soon as the job ends, and its ``on_wake(None)`` to
``CompletionHub.notify_all``: every waiter re-reads the store once after a (re)subscription::

    done = RedisDoneWakeup(connector, on_wake=on_job_end).start()

``RedisCancelWakeup`` follows the ``cancel`` channel (``RedisKeys.cancel``), where the cancel
script publishes the id of a running job its owner asks to stop: every process with workers
wires it to its event-log reader's ``poke``, so the worker holding the job learns it at once.

Redis going away never ends the thread: it logs a warning, reconnects with exponential backoff
and subscribes again. Its connections come from the process's ``RedisConnector``, so with
Sentinel each reconnect asks where the primary is now: after a failover the subscriber follows
the promoted replica on its own, and its ``on_wake(None)`` covers what was published meanwhile.
A link that dies without a reset (a partition) is noticed by a PING sent after
``health_check_s`` of silence that gets no answer within another ``health_check_s``.
``close()`` stops the thread within about ``LISTEN_TICK_S`` (or, while it is connecting to an
unresponsive host, the connect timeout).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import redis
from redis.client import PubSub

from qwenserve.store.redis.client import RedisConnector
from qwenserve.store.redis_keys import DEFAULT_NAMESPACE, RedisKeys

log = logging.getLogger("qwenserve")

WakeCallback = Callable[[str | None], None]
"""Called with a message (the slug of a job that became claimable on the wake channel, the id of a
job that ended on the done channel), or None once per (re)subscription."""

LISTEN_TICK_S = 0.1
HEALTH_CHECK_S = 15.0
RECONNECT_BACKOFF_BASE_S = 0.05
RECONNECT_BACKOFF_CAP_S = 2.0
CONNECT_TIMEOUT_S = 5.0
SOCKET_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0
_PING_TEXT = "qwenserve-wakeup"


class RedisWakeup:
    """A background subscriber to the wake channel, calling ``on_wake`` per message.

    Args:
        connector: where its connections come from (the process's ``RedisConnector``), or a
            Redis store URL to make one from (tests); each (re)connection makes its own client.
        on_wake: called on the subscriber thread with the published slug, or with None once
            each time the subscription is confirmed (at start and after each reconnect). It
            should be quick (``WorkerRunner.wake`` sets an event); an exception from it is
            logged and the subscriber goes on.
        namespace: the key namespace of the store whose channel to follow.
        health_check_s: silence after which a PING checks the link; no answer within as long
            again counts as a lost connection.
        backoff_base_s, backoff_cap_s: reconnect delays double from the base up to the cap.
        on_close: called once by ``close()`` (``RedisSignals`` ends the in-process twin of this
            subscription there).

    Raises:
        ValueError: the namespace is invalid (see ``RedisKeys``), or the URL is not a Redis
            store URL.
    """

    _label = "wake-up subscriber"
    """Names the subscriber in its log lines and thread name."""
    _meanwhile = "workers poll meanwhile"
    """What covers for it while Redis is unreachable (said in the warning)."""

    @staticmethod
    def _channel_of(keys: RedisKeys) -> str:
        return keys.wake()

    def __init__(
        self,
        connector: RedisConnector | str,
        on_wake: WakeCallback,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        health_check_s: float = HEALTH_CHECK_S,
        backoff_base_s: float = RECONNECT_BACKOFF_BASE_S,
        backoff_cap_s: float = RECONNECT_BACKOFF_CAP_S,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        # A URL is parsed here, not in the thread that would retry it forever.
        self.connector = (
            connector
            if isinstance(connector, RedisConnector)
            else RedisConnector.from_url(connector)
        )
        self.channel = self._channel_of(RedisKeys(namespace))
        self.health_check_s = health_check_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self._on_wake = on_wake
        self._on_close = on_close
        self._closed = threading.Event()
        self._subscribed = threading.Event()
        self._failures = 0  # in a row, since the last confirmed subscription (thread only)
        self._thread = threading.Thread(
            target=self._run, name=f"qwenserve-{self._label.replace(' ', '-')}", daemon=True
        )

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Self:
        """Start the subscriber thread (it connects in the background); returns self."""
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """True from ``start()`` until ``close()`` has stopped the thread."""
        return self._thread.is_alive()

    @property
    def subscribed(self) -> bool:
        """True while Redis has confirmed the subscription (messages are being received)."""
        return self._subscribed.is_set()

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Wait until the subscription is confirmed; False if it is not within ``timeout_s``."""
        return self._subscribed.wait(timeout_s)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the thread and drop its connection (idempotent)."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()
        self._closed.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._listen()
            except Exception as error:  # never let the worker lose its wake-ups for good
                if self._closed.is_set():
                    break
                self._failures += 1
                if self._failures > 1:
                    log.debug("%s: Redis still unreachable (%s)", self._label, error)
                elif isinstance(error, redis.RedisError | OSError):
                    log.warning(
                        "%s: Redis unreachable (%s); reconnecting, %s",
                        self._label,
                        error,
                        self._meanwhile,
                    )
                else:
                    log.exception("%s failed; reconnecting", self._label)
                delay = self.backoff_base_s * 2 ** min(self._failures - 1, 30)
                self._closed.wait(min(self.backoff_cap_s, delay))

    def _listen(self) -> None:
        """One connection's life: subscribe, deliver messages, check the link when quiet."""
        # No retries in the client: reconnecting is this loop's job (with its backoff, logging
        # and catch-up call).
        client = self.connector.subscriber_client(
            connect_timeout_s=CONNECT_TIMEOUT_S, socket_timeout_s=SOCKET_TIMEOUT_S
        )
        pubsub: PubSub = client.pubsub()  # type: ignore[no-untyped-call,unused-ignore]  # unannotated before redis 7
        try:
            pubsub.subscribe(self.channel)
            heard_at = time.monotonic()
            pinged_at: float | None = None
            while not self._closed.is_set():
                message = pubsub.get_message(timeout=LISTEN_TICK_S)
                now = time.monotonic()
                if message is not None:
                    heard_at, pinged_at = now, None
                    self._handle(message)
                elif pinged_at is not None:
                    if now - pinged_at > self.health_check_s:
                        raise redis.ConnectionError(
                            f"no answer to PING in {self.health_check_s:g} s"
                        )
                elif now - heard_at > self.health_check_s:
                    pubsub.ping(_PING_TEXT)
                    pinged_at = now
        finally:
            self._subscribed.clear()
            try:
                pubsub.close()
                client.close()
            except Exception:  # closing a dead link: nothing left to release
                pass

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "subscribe" and message.get("channel") == self.channel:
            if self._failures:
                log.info("%s reconnected to Redis", self._label)
            self._failures = 0
            self._subscribed.set()
            # Whatever was published before this subscription was missed: look once now.
            self._call(None)
        elif kind == "message":
            self._call(str(message.get("data", "")))

    def _call(self, data: str | None) -> None:
        try:
            self._on_wake(data)
        except Exception:
            log.exception("%s: callback failed (message %r)", self._label, data)


class RedisDoneWakeup(RedisWakeup):
    """A background subscriber to the done channel, calling ``on_wake(job_id)`` for every job that
    ends on any node, and ``on_wake(None)`` once per confirmed (re)subscription (ends published
    while it was not listening are lost: every waiter should look again).

    Same arguments, threading, reconnecting and ``close()`` as ``RedisWakeup``.
    """

    _label = "job-end subscriber"
    _meanwhile = "waiters re-read the store meanwhile"

    @staticmethod
    def _channel_of(keys: RedisKeys) -> str:
        return keys.done()


class RedisCancelWakeup(RedisWakeup):
    """A background subscriber to the cancel channel, calling ``on_wake(job_id)`` for every job
    whose owner asks to cancel it while it runs, on any node, and ``on_wake(None)`` once per
    confirmed (re)subscription (requests published meanwhile are in the event log: read it).

    Same arguments, threading, reconnecting and ``close()`` as ``RedisWakeup``.
    """

    _label = "cancel subscriber"
    _meanwhile = "workers read the event log every QWENSERVE_EVENT_POLL_S meanwhile"

    @staticmethod
    def _channel_of(keys: RedisKeys) -> str:
        return keys.cancel()
