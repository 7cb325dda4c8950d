"""The wake-up subscribers against a real redis-server: the store's own scripts publish (a slug
when a job becomes claimable, a job id when a job ends), the subscriber hears them on its own
connection, and it outlives a Redis outage, after which an API node's waiters all look again."""

from __future__ import annotations

import asyncio
import logging
import queue
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from qwenserve.backends import open_backend
from qwenserve.cli.compose import start_done_wakeup
from qwenserve.config import Settings
from qwenserve.jobs import JobStatus
from qwenserve.notify import CompletionHub
from qwenserve.store.redis import RedisStore
from qwenserve.store.redis_wakeup import RedisCancelWakeup, RedisDoneWakeup, RedisWakeup
from tests.redis_server import RedisServer
from tests.store.contract import Clock, balance, make_job, make_key, make_result

pytestmark = pytest.mark.redis

HEAR_TIMEOUT_S = 5.0


class Heard:
    """An ``on_wake`` that records what it was called with."""

    def __init__(self) -> None:
        self.calls: queue.Queue[str | None] = queue.Queue()

    def __call__(self, slug: str | None) -> None:
        self.calls.put(slug)

    def next(self, timeout_s: float = HEAR_TIMEOUT_S) -> str | None:
        return self.calls.get(timeout=timeout_s)

    def next_slug(self, timeout_s: float = HEAR_TIMEOUT_S) -> str | None:
        """The next call with a slug, skipping look-once calls (None)."""
        deadline = time.monotonic() + timeout_s
        while (slug := self.next(max(0.0, deadline - time.monotonic()))) is None:
            pass
        return slug

    def nothing_within(self, seconds: float) -> bool:
        try:
            self.calls.get(timeout=seconds)
        except queue.Empty:
            return True
        return False


@pytest.fixture
def namespace() -> str:
    return f"w{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store(redis_url: str, redis_client: redis.Redis, namespace: str) -> Iterator[RedisStore]:
    opened = RedisStore.from_url(redis_url, namespace=namespace)
    yield opened
    opened.close()


def _subscribed(wakeup: RedisWakeup, heard: Heard) -> None:
    assert wakeup.wait_subscribed(HEAR_TIMEOUT_S)
    assert heard.next() is None  # the look-once call every confirmed subscription makes


def test_submit_release_and_expired_lease_wake_the_subscriber_on_its_own_connection(
    redis_url: str, store: RedisStore, namespace: str
) -> None:
    clock = Clock()
    heard = Heard()
    with RedisWakeup(redis_url, heard, namespace=namespace) as wakeup:
        _subscribed(wakeup, heard)
        key = make_key(store, clock)
        job = make_job(key, clock, slug="qwen-image-edit")
        store.submit(job, rpm=0, now=clock.now)
        assert heard.next() == "qwen-image-edit"

        # A job given back to the queue is claimable again: idle workers hear of it too.
        assert store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
        assert store.release(job.id, "w1", now=clock.now)
        assert heard.next() == "qwen-image-edit"
        # So is a job whose lease is cut short (a dead server's jobs, made claimable at once).
        assert store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
        assert store.expire_leases(now=clock.now) == 1
        assert heard.next() == "qwen-image-edit"

        # Claiming and finishing make nothing claimable: no message.
        assert store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
        assert store.fail(job.id, "w1", kind="InferenceError", message="x", now=clock.now)
        # Another deployment's submits (another namespace) are not ours to hear.
        other = RedisStore.from_url(redis_url, namespace=f"{namespace}x")
        try:
            other.submit(make_job(make_key(other, clock), clock), rpm=0, now=clock.now)
        finally:
            other.close()
        assert heard.nothing_within(0.3)


def test_the_done_channel_carries_the_id_of_every_job_that_ends(
    redis_url: str, store: RedisStore, namespace: str
) -> None:
    clock = Clock()
    heard = Heard()
    result = make_result()
    with RedisDoneWakeup(redis_url, heard, namespace=namespace) as done:
        _subscribed(done, heard)
        key = make_key(store, clock)

        # Completed: queuing, claiming, renewing and giving back end nothing, so say nothing.
        completed = make_job(key, clock)
        store.submit(completed, rpm=0, now=clock.now)
        assert store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
        assert store.heartbeat("w1", {completed.id: None}, lease_s=30, now=clock.now).owned
        assert store.release(completed.id, "w1", now=clock.now)
        assert store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
        assert not store.complete(completed.id, "w2", result, now=clock.now)  # not its lease
        assert heard.nothing_within(0.2)
        assert store.complete(completed.id, "w1", result, now=clock.now)
        assert heard.next() == completed.id

        # Failed by its worker.
        failed = make_job(key, clock)
        store.submit(failed, rpm=0, now=clock.now)
        assert store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
        assert store.fail(failed.id, "w1", kind="InferenceError", message="x", now=clock.now)
        assert heard.next() == failed.id

        # Failed inside another worker's claim: its lease ran out after max_attempts.
        lost = make_job(key, clock)
        store.submit(lost, rpm=0, now=clock.now)
        assert store.claim("w1", slugs=None, lease_s=30, max_attempts=1, now=clock.now)
        clock.advance(31)
        assert store.claim("w2", slugs=None, lease_s=30, max_attempts=1, now=clock.now) == []
        assert heard.next() == lost.id
        gave_up = store.get_job(lost.id, now=clock.now)
        assert gave_up is not None and gave_up.status is JobStatus.FAILED

        # Expired before any worker took it: refunded and purged.
        before = balance(store, key)
        expired = make_job(key, clock, ttl_s=5)
        store.submit(expired, rpm=0, now=clock.now)
        assert [job.id for job in store.purge_expired(now=clock.advance(6))] == [expired.id]
        assert heard.next() == expired.id
        assert balance(store, key) == pytest.approx(before)

        # Purging finished jobs ends nothing new; another namespace's ends are not ours.
        clock.advance(3600)
        assert len(store.purge_expired(now=clock.now)) == 3
        other = RedisStore.from_url(redis_url, namespace=f"{namespace}x")
        try:
            job = make_job(make_key(other, clock), clock)
            other.submit(job, rpm=0, now=clock.now)
            assert other.fail(job.id, None, kind="InvalidRequest", message="x", now=clock.now)
        finally:
            other.close()
        assert heard.nothing_within(0.3)


def test_the_cancel_channel_carries_each_running_job_its_owner_cancels_once(
    redis_url: str, store: RedisStore, namespace: str
) -> None:
    """Worker processes read the event log when they hear it (the holder stops the job at its
    next step); a queued job's cancel ends it in the script, with nothing for a worker."""
    clock = Clock()
    heard = Heard()
    with RedisCancelWakeup(redis_url, heard, namespace=namespace) as cancels:
        _subscribed(cancels, heard)
        key = make_key(store, clock)
        queued = make_job(key, clock)
        store.submit(queued, rpm=0, now=clock.now)
        assert store.cancel(queued.id, queued.key_id, now=clock.now).job.status is JobStatus.FAILED
        assert heard.nothing_within(0.2)

        running = make_job(key, clock)
        store.submit(running, rpm=0, now=clock.now)
        assert store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
        assert store.cancel(running.id, running.key_id, now=clock.now).job.cancel_requested_at
        assert heard.next() == running.id
        store.cancel(running.id, running.key_id, now=clock.now)  # asked again: already known
        assert heard.nothing_within(0.2)


async def test_an_api_nodes_waiters_all_look_again_after_the_subscriber_reconnects() -> None:
    """Ends published while the subscriber was away are lost, so every waiter re-reads once;
    between outages each end wakes only its own waiter. The fallback here is 30 s: any wake
    within the test comes from the subscriber."""
    clock = Clock()
    hub = CompletionHub(fallback_poll_s=30.0)

    async def wait(job_id: str) -> None:
        with hub.watch(job_id) as event:
            await hub.sleep_until_notified(event, timeout_s=60.0)

    with RedisServer() as server:
        backend = open_backend(Settings(store=server.url))
        done = start_done_wakeup(backend, hub)
        assert isinstance(done, RedisDoneWakeup)
        store = RedisStore.from_url(server.url)
        try:
            assert await asyncio.to_thread(done.wait_subscribed, HEAR_TIMEOUT_S)
            await asyncio.sleep(0.1)  # the look-once call of the first subscription has run
            job = make_job(make_key(store, clock), clock)
            store.submit(job, rpm=0, now=clock.now)
            waiting = {job_id: asyncio.create_task(wait(job_id)) for job_id in ("a", "b", job.id)}
            await asyncio.sleep(0.2)
            assert not any(task.done() for task in waiting.values())

            assert store.claim("w1", slugs=None, lease_s=30, max_attempts=3, now=clock.now)
            assert store.fail(job.id, "w1", kind="InferenceError", message="x", now=clock.now)
            await asyncio.wait_for(waiting.pop(job.id), HEAR_TIMEOUT_S)
            await asyncio.sleep(0.2)
            assert not any(task.done() for task in waiting.values())

            server.kill()
            await asyncio.to_thread(_until_unsubscribed, done)
            server.start()  # same port: the subscriber comes back on its own
            await asyncio.wait_for(asyncio.gather(*waiting.values()), HEAR_TIMEOUT_S)
        finally:
            done.close()
            store.close()
            backend.close()


def _until_unsubscribed(subscriber: RedisWakeup) -> None:
    deadline = time.monotonic() + HEAR_TIMEOUT_S
    while subscriber.subscribed:
        assert time.monotonic() < deadline, "the subscriber did not notice Redis going away"
        time.sleep(0.01)


def test_a_failing_callback_does_not_stop_the_subscriber(
    redis_url: str, store: RedisStore, namespace: str
) -> None:
    clock = Clock()
    heard = Heard()

    def flaky(slug: str | None) -> None:
        heard(slug)
        if slug is not None:
            raise RuntimeError("the callback broke")

    with RedisWakeup(redis_url, flaky, namespace=namespace) as wakeup:
        _subscribed(wakeup, heard)
        key = make_key(store, clock)
        for _ in range(2):
            store.submit(make_job(key, clock), rpm=0, now=clock.now)
            assert heard.next() == "qwen-image"


def test_survives_a_redis_outage_and_delivers_afterwards(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    heard = Heard()
    with RedisServer() as server:
        wakeup = RedisWakeup(server.url, heard, backoff_base_s=0.02, backoff_cap_s=0.2).start()
        try:
            _subscribed(wakeup, heard)
            with caplog.at_level(logging.WARNING, logger="qwenserve"):
                server.kill()
                deadline = time.monotonic() + HEAR_TIMEOUT_S
                while wakeup.subscribed and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert not wakeup.subscribed
                time.sleep(0.5)  # several failed reconnects while Redis is down
                server.start()  # same port: the subscriber comes back on its own
                assert wakeup.wait_subscribed(HEAR_TIMEOUT_S)
            assert any("Redis unreachable" in r.getMessage() for r in caplog.records)
            assert heard.next() is None  # it looks once for what it may have missed

            store = RedisStore.from_url(server.url)
            try:
                store.submit(make_job(make_key(store, clock), clock), rpm=0, now=clock.now)
            finally:
                store.close()
            assert heard.next() == "qwen-image"
        finally:
            wakeup.close()


def test_a_frozen_redis_is_noticed_by_the_ping_check() -> None:
    clock = Clock()
    heard = Heard()
    with RedisServer() as server:
        assert server.process is not None
        wakeup = RedisWakeup(server.url, heard, health_check_s=0.2, backoff_cap_s=0.2).start()
        try:
            _subscribed(wakeup, heard)
            # SIGSTOP: the TCP link stays up but nothing answers, as in a network partition.
            server.process.send_signal(signal.SIGSTOP)
            try:
                deadline = time.monotonic() + HEAR_TIMEOUT_S
                while wakeup.subscribed and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert not wakeup.subscribed
            finally:
                server.process.send_signal(signal.SIGCONT)
            assert wakeup.wait_subscribed(HEAR_TIMEOUT_S)
            store = RedisStore.from_url(server.url)
            try:
                store.submit(make_job(make_key(store, clock), clock), rpm=0, now=clock.now)
            finally:
                store.close()
            assert heard.next_slug() == "qwen-image"
        finally:
            wakeup.close()


def test_close_is_prompt_even_while_redis_is_unreachable() -> None:
    server = RedisServer().start()
    url = server.url
    server.stop()
    heard = Heard()
    wakeup = RedisWakeup(url, heard, backoff_base_s=10.0, backoff_cap_s=10.0).start()
    time.sleep(0.2)  # it has failed to connect and is backing off
    started = time.monotonic()
    wakeup.close()
    assert time.monotonic() - started < 1.0
    assert not wakeup.running
    assert heard.nothing_within(0.0)


def test_a_non_redis_url_is_refused_at_start() -> None:
    with pytest.raises(ValueError):
        RedisWakeup("http://127.0.0.1:1/", lambda slug: None).start()
