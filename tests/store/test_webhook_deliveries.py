"""Webhook delivery records, the same tests on SQLite and a real redis-server: enqueued once per
job ending from the event log, claimed under a lease by one dispatcher at a time, attempts kept."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenserve.jobs import Job
from qwenserve.store.base import Store
from qwenserve.store.redis import RedisStore
from qwenserve.store.sqlite import SqliteStore
from qwenserve.store.webhooks import DeliveryStatus, WebhookAttempt
from tests.store.contract import Clock, claim_one, make_job, make_key, make_result

URL = "https://hooks.example.com/in"


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened: Store
    if request.param == "sqlite":
        opened = SqliteStore(tmp_path / "qwenserve.db")
    else:
        url: str = request.getfixturevalue("redis_url")
        request.getfixturevalue("redis_client")  # emptied
        opened = RedisStore.from_url(url, namespace=f"t{uuid.uuid4().hex[:10]}")
    yield opened
    opened.close()


def _ended(store: Store, clock: Clock, *, webhook: str | None = URL) -> Job:
    key = make_key(store, clock)
    job = dataclasses.replace(make_job(key, clock), webhook_url=webhook)
    store.submit(job, rpm=0, now=clock.now)
    claimed = claim_one(store, clock)
    assert claimed is not None and claimed.webhook_url == webhook
    assert store.complete(job.id, "w1", make_result(), now=clock.now)
    return job


def _follow(store: Store, clock: Clock) -> int:
    events = store.events(after=store.webhook_cursor(), limit=500)
    if not events:
        return 0
    return store.enqueue_webhooks(events, cursor=events[-1].id, now=clock.now)


def test_one_delivery_per_ending_and_the_cursor_persists(store: Store) -> None:
    clock = Clock()
    job = _ended(store, clock)
    other = _ended(store, clock, webhook=None)
    assert store.get_webhook(job.id) is None
    assert _follow(store, clock) == 1
    assert _follow(store, clock) == 0  # the cursor moved: nothing read twice
    everything = store.events(limit=500)
    assert store.enqueue_webhooks(everything, cursor=everything[-1].id, now=clock.now) == 0
    delivery = store.get_webhook(job.id)
    assert delivery is not None and store.get_webhook(other.id) is None
    ending = [e for e in everything if e.job_id == job.id and e.type.is_terminal]
    assert delivery.event_id == ending[0].id
    assert (delivery.url, delivery.status, delivery.attempts) == (URL, DeliveryStatus.PENDING, ())
    assert delivery.to_dict() == {
        "url": URL,
        "status": "pending",
        "attempts": [],
        "next_retry_at": None,
    }


def test_claim_lease_retry_and_outcome(store: Store) -> None:
    clock = Clock()
    job = _ended(store, clock)
    _follow(store, clock)
    [claimed] = store.claim_webhooks("n1", lease_s=30, now=clock.now)
    assert claimed.job_id == job.id
    assert store.claim_webhooks("n2", lease_s=30, now=clock.now) == []  # leased
    failed = WebhookAttempt(at=clock.now, status_code=500)
    assert not store.record_webhook_attempt(
        job.id,
        "n2",
        failed,
        status=DeliveryStatus.PENDING,
        next_attempt_at=0,
        body="{}",
        now=clock.now,
    )
    assert store.record_webhook_attempt(
        job.id,
        "n1",
        failed,
        status=DeliveryStatus.PENDING,
        next_attempt_at=clock.now + 10,
        body='{"a": 1}',
        now=clock.now,
    )
    assert store.claim_webhooks("n2", lease_s=30, now=clock.now + 5) == []  # not due yet
    [again] = store.claim_webhooks("n2", lease_s=30, now=clock.advance(10))
    assert again.body == '{"a": 1}' and again.attempts == (failed,)
    # n2's lease runs out (it died): n3 takes it over and n2 can no longer record.
    [taken] = store.claim_webhooks("n3", lease_s=30, now=clock.advance(31))
    assert taken.job_id == job.id
    ok = WebhookAttempt(at=clock.now, status_code=204)
    assert not store.record_webhook_attempt(
        job.id,
        "n2",
        ok,
        status=DeliveryStatus.DELIVERED,
        next_attempt_at=None,
        body="x",
        now=clock.now,
    )
    assert store.record_webhook_attempt(
        job.id,
        "n3",
        ok,
        status=DeliveryStatus.DELIVERED,
        next_attempt_at=None,
        body="x",
        now=clock.now,
    )
    done = store.get_webhook(job.id)
    assert done is not None and done.status is DeliveryStatus.DELIVERED
    assert done.body == '{"a": 1}' and done.attempts == (failed, ok)
    assert done.to_dict()["attempts"] == [
        {"at": failed.at, "status_code": 500},
        {"at": ok.at, "status_code": 204},
    ]
    assert store.claim_webhooks("n4", lease_s=30, now=clock.advance(3600)) == []


def test_release_leases_after_a_restart(store: Store) -> None:
    clock = Clock()
    job, waiting = _ended(store, clock), _ended(store, clock)
    _follow(store, clock)
    claimed = store.claim_webhooks("dead", lease_s=60, now=clock.now)
    assert {d.job_id for d in claimed} == {job.id, waiting.id}
    retry = WebhookAttempt(at=clock.now, status_code=503)
    assert store.record_webhook_attempt(
        waiting.id,
        "dead",
        retry,
        status=DeliveryStatus.PENDING,
        next_attempt_at=clock.now + 100,
        body="{}",
        now=clock.now,
    )
    assert store.claim_webhooks("new", lease_s=60, now=clock.advance(1)) == []  # still leased
    assert store.release_webhook_leases(now=clock.now) == 1  # not the one merely waiting
    [again] = store.claim_webhooks("new", lease_s=60, now=clock.now)
    assert again.job_id == job.id and again.attempts == ()
    assert store.claim_webhooks("other", lease_s=60, now=clock.now) == []  # leased anew
    ok = WebhookAttempt(at=clock.now, status_code=200)
    assert not store.record_webhook_attempt(  # the dead owner's late word changes nothing
        job.id,
        "dead",
        ok,
        status=DeliveryStatus.DELIVERED,
        next_attempt_at=None,
        body="{}",
        now=clock.now,
    )
    assert store.release_webhook_leases(now=clock.now) == 1
    due = {d.job_id: d for d in store.claim_webhooks("new", lease_s=60, now=clock.advance(100))}
    assert set(due) == {job.id, waiting.id} and due[waiting.id].attempts == (retry,)


def test_racing_claims_take_each_delivery_once(store: Store) -> None:
    clock = Clock()
    jobs = [_ended(store, clock) for _ in range(6)]
    _follow(store, clock)
    taken: list[str] = []
    lock = threading.Lock()

    def claim(owner: str) -> None:
        for _ in range(5):
            got = store.claim_webhooks(owner, lease_s=60, now=clock.now, limit=2)
            with lock:
                taken.extend(d.job_id for d in got)

    threads = [threading.Thread(target=claim, args=(f"n{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == sorted(job.id for job in jobs)


def test_webhook_secret_get_or_set_and_rotate(store: Store) -> None:
    clock = Clock()
    key = make_key(store, clock)
    assert store.webhook_secret("nope", candidate="whsec_a") is None
    assert store.webhook_secret(key.id, candidate="whsec_a") == "whsec_a"
    assert store.webhook_secret(key.id, candidate="whsec_b") == "whsec_a"
    assert store.webhook_secret(key.id, candidate="whsec_c", rotate=True) == "whsec_c"
    assert store.get_key(key.id) == key  # the secret is not part of the key record
