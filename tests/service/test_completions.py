"""Every way a job ends reaches the completion hub through the store's durable event log, on a
real SQLite store and a real redis-server: worker ends, engine failures, cancels, give-ups after
``max_attempts`` (which happen inside another worker's claim) and refunds at expiry."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qwenserve.accounts.keys import create_api_key
from qwenserve.jobs import JobEvent, JobEventType, JobStatus
from qwenserve.media.storage import LocalMediaStore
from qwenserve.notify import CompletionHub, EventFollower, follow_completions
from qwenserve.store.sqlite import SqliteStore
from tests.service.test_worker import Clock, RaisingEngine, SolidEngine, runner, submit

HEAR_TIMEOUT_S = 5.0
"""The hub's own fallback is 60 s here: a waiter that wakes sooner was woken by the log."""


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "jobs.db")
    yield opened
    opened.close()


@pytest.fixture
def media(tmp_path: Path) -> LocalMediaStore:
    return LocalMediaStore(tmp_path / "media")


@pytest.fixture
def hub_on(store: Any) -> Iterator[Callable[[Any], CompletionHub]]:
    followers: list[EventFollower] = []

    def make(of: Any = store) -> CompletionHub:
        hub = CompletionHub(fallback_poll_s=60.0)
        followers.append(follow_completions(of, hub, poll_s=0.05))
        return hub

    yield make
    for follower in followers:
        follower.close()


async def ended(hub: CompletionHub, job_id: str, cause: Callable[[], object]) -> None:
    """Watch ``job_id``, run ``cause`` (in a thread: it may block), and wait for the hub."""
    with hub.watch(job_id) as event:
        await asyncio.to_thread(cause)
        await asyncio.wait_for(event.wait(), HEAR_TIMEOUT_S)


def give_up(store: Any, clock: Clock) -> None:
    """Two holders of the only job die (their leases run out); the next claim fails it."""
    for attempt in range(2):
        assert store.claim(f"dead-{attempt}", slugs=None, lease_s=30, max_attempts=2, now=clock())
        clock.now += 31
    assert store.claim("next", slugs=None, lease_s=30, max_attempts=2, now=clock()) == []


async def test_every_kind_of_ending_reaches_the_hub(
    store: SqliteStore, media: LocalMediaStore, clock: Clock, hub_on: Any
) -> None:
    hub = hub_on()
    _, key = create_api_key(store, name="t", credits_usd=5.0, rpm=0, now=clock())

    # Completed and failed by a worker that tells nobody itself (no on_job_done).
    done = submit(store, key.id, clock, seed=1)
    worker = runner(store, media, SolidEngine(), clock)
    await ended(hub, done.id, lambda: (worker.run_once(), worker.wait_finished()))
    worker.close()
    broken = submit(store, key.id, clock, seed=2)
    failing = runner(store, media, RaisingEngine(RuntimeError("boom")), clock)
    await ended(hub, broken.id, failing.run_once)
    failing.close()

    # Cancelled while queued (the API's cancel ends it in the store, no worker involved).
    queued = submit(store, key.id, clock, seed=3)
    await ended(hub, queued.id, lambda: store.cancel(queued.id, key.id, now=clock()))

    # Given up after max_attempts: two holders died; the next claim (anyone's) fails it.
    doomed = submit(store, key.id, clock, seed=4)

    await ended(hub, doomed.id, lambda: give_up(store, clock))
    assert store.get_job(doomed.id, now=clock()).status is JobStatus.FAILED  # type: ignore[union-attr]

    # Expired before it ran: the purge refunds it and tells the log.
    stale = submit(store, key.id, clock, seed=5)

    def purge() -> None:
        clock.now += 3601
        assert stale.id in [j.id for j in store.purge_expired(now=clock())]

    await ended(hub, stale.id, purge)


async def test_a_waiter_of_a_running_job_is_not_woken_by_others(
    store: SqliteStore, clock: Clock, hub_on: Any
) -> None:
    hub = hub_on()
    _, key = create_api_key(store, name="t", credits_usd=5.0, rpm=0, now=clock())
    mine, other = submit(store, key.id, clock, seed=1), submit(store, key.id, clock, seed=2)
    with hub.watch(mine.id) as event:
        store.cancel(other.id, key.id, now=clock())
        store.claim("w", slugs=None, lease_s=30, max_attempts=3, now=clock())  # mine: processing
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(event.wait(), 0.5)


def test_a_follower_resumes_where_it_stopped_after_a_restart(tmp_path: Path, clock: Clock) -> None:
    first = SqliteStore(tmp_path / "jobs.db")
    _, key = create_api_key(first, name="t", credits_usd=5.0, rpm=0, now=clock())
    job = submit(first, key.id, clock, seed=1)
    follower = EventFollower(first).start()
    seen: list[JobEvent] = []
    follower.subscribe(seen.append)
    follower.read()
    position = follower.position
    follower.close()
    # While nobody follows: the job is cancelled, and the process restarts.
    first.cancel(job.id, key.id, now=clock())
    first.close()
    again = SqliteStore(tmp_path / "jobs.db")
    resumed = EventFollower(again, after=position)
    resumed.subscribe(seen.append)
    assert resumed.read() == 1
    [event] = seen
    assert event.job_id == job.id and event.type is JobEventType.FAILED
    assert event.error_kind == "cancelled"
    again.close()


def test_a_subscriber_with_history_gets_the_retained_log_once_and_bounded(
    store: SqliteStore, clock: Clock
) -> None:
    _, key = create_api_key(store, name="t", credits_usd=5.0, rpm=0, now=clock())
    jobs = [submit(store, key.id, clock, seed=seed) for seed in range(3)]  # 3 QUEUED events
    reader = EventFollower(store)  # placed at the newest: "from now on"
    past: list[JobEvent] = []
    bounded: list[JobEvent] = []
    live: list[JobEvent] = []
    reader.subscribe(past.append, history=100)
    reader.subscribe(bounded.append, history=2)
    reader.subscribe(live.append)
    assert [e.job_id for e in past] == [j.id for j in jobs], "the log before it, in order"
    assert [e.job_id for e in bounded] == [j.id for j in jobs[:2]], "at most `history`"
    assert live == []
    store.cancel(jobs[0].id, key.id, now=clock())
    assert reader.read() == 1
    # After the history, each subscriber gets the new event once (nothing handed twice).
    assert [e.type for e in past[3:]] == [e.type for e in live] == [JobEventType.FAILED]
    assert len(bounded) == 3
    reader.close()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    from tests.redis_server import RedisServer, require_redis_server

    require_redis_server()
    with RedisServer() as server:
        yield server.url


@pytest.mark.redis
async def test_a_give_up_on_redis_reaches_the_hub(redis_url: str, hub_on: Any) -> None:
    from qwenserve.store.redis import RedisStore

    clock = Clock()
    store = RedisStore.from_url(redis_url, namespace=f"t{uuid.uuid4().hex[:8]}")
    try:
        hub = hub_on(store)
        _, key = create_api_key(store, name="t", credits_usd=5.0, rpm=0, now=clock())
        doomed = submit(store, key.id, clock, seed=1)  # type: ignore[arg-type]

        await ended(hub, doomed.id, lambda: give_up(store, clock))
        assert store.get_job(doomed.id, now=clock()).status is JobStatus.FAILED  # type: ignore[union-attr]
    finally:
        store.close()
