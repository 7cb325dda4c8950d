"""The Store contract for backpressure and start deadlines, on every backend.

Queue limits (the cluster's ``max_queued`` passed to ``submit``, a key's own ``max_queued``) are
checked in the submit's own atomic step, before any charge or rate-limit count; a job's
``start_by`` ends it FAILED (``start_timeout``), refunded, if no worker took it by then.

Mixed into each backend's contract class beside ``StoreContract`` (same ``store`` and ``clock``
fixtures).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest

from qwenserve.errors import KeyQueueFull, QueueFull, RateLimited
from qwenserve.jobs import Job, JobEventType, JobStatus
from qwenserve.store.base import ApiKey, Store
from qwenserve.store.rules import START_TIMEOUT_KIND
from tests.store.contract import Clock, balance, claim_one, make_job, make_key
from tests.store.contract_policy import refused


def limited_key(store: Store, clock: Clock, *, max_queued: int, rpm: int = 0) -> ApiKey:
    key = make_key(store, clock, balance_usd=1.0, rpm=rpm)
    updated = store.update_key(key.id, max_queued=max_queued)
    assert updated is not None and updated.max_queued == max_queued
    return updated


def deadline_job(key: ApiKey, clock: Clock, start_timeout_s: float) -> Job:
    return dataclasses.replace(make_job(key, clock), start_by=clock.now + start_timeout_s)


class BackpressureContract:
    """``Store.submit``'s queue limits, ``Store.update_key`` and start deadlines."""

    def test_update_key_changes_limits_and_keeps_the_rest(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock, balance_usd=2.0, rpm=5)
        assert key.max_queued == 0
        updated = store.update_key(key.id, max_queued=3)
        assert updated is not None and (updated.rpm, updated.max_queued) == (5, 3)
        updated = store.update_key(key.id, rpm=0)
        assert updated is not None and (updated.rpm, updated.max_queued) == (0, 3)
        assert updated.balance_usd == 2.0 and updated.name == key.name
        assert store.get_key(key.id) == updated
        assert store.update_key("no-such-key", rpm=1) is None

    def test_cluster_queue_limit_refuses_before_any_charge(
        self, store: Store, clock: Clock
    ) -> None:
        first, second = make_key(store, clock, rpm=3), make_key(store, clock)
        store.submit(make_job(first, clock), rpm=3, now=clock.now, max_queued=2)
        store.submit(make_job(second, clock), rpm=0, now=clock.now, max_queued=2)
        with pytest.raises(QueueFull) as refusal:
            store.submit(make_job(first, clock), rpm=3, now=clock.now, max_queued=2)
        assert refusal.value.http_status == 503 and refusal.value.retry_after_s
        assert "queue is full" in refusal.value.message
        assert balance(store, first) == pytest.approx(9.9)  # one job charged, not two
        # A claimed job no longer waits: there is room again, and the refusal used no rpm.
        assert claim_one(store, clock) is not None
        store.submit(make_job(first, clock), rpm=3, now=clock.now, max_queued=2)
        store.submit(make_job(first, clock), rpm=3, now=clock.now, max_queued=0)  # unlimited
        with pytest.raises(RateLimited):
            store.submit(make_job(first, clock), rpm=3, now=clock.now)

    def test_key_queue_limit_is_per_key(self, store: Store, clock: Clock) -> None:
        limited = limited_key(store, clock, max_queued=2)
        other = make_key(store, clock)
        jobs = [make_job(limited, clock) for _ in range(2)]
        for job in jobs:
            store.submit(job, rpm=0, now=clock.now)
        with pytest.raises(KeyQueueFull) as refusal:
            store.submit(make_job(limited, clock), rpm=0, now=clock.now)
        assert refusal.value.http_status == 429 and refusal.value.limit == 2
        assert refusal.value.retry_after_s > 0
        assert balance(store, limited) == pytest.approx(0.8)
        store.submit(make_job(other, clock), rpm=0, now=clock.now)  # another key is not held
        # A cancelled job frees its place; so does a failed one.
        store.cancel(jobs[0].id, limited.id, now=clock.now)
        store.submit(make_job(limited, clock), rpm=0, now=clock.now)
        assert store.fail(jobs[1].id, None, kind="x", message="gone", now=clock.now)
        store.submit(make_job(limited, clock), rpm=0, now=clock.now)
        with pytest.raises(KeyQueueFull):
            store.submit(make_job(limited, clock), rpm=0, now=clock.now)
        # Raising the limit takes effect on the next submit.
        store.update_key(limited.id, max_queued=0)
        store.submit(make_job(limited, clock), rpm=0, now=clock.now)

    def test_released_and_expired_jobs_count_as_they_wait(self, store: Store, clock: Clock) -> None:
        key = limited_key(store, clock, max_queued=1)
        job = make_job(key, clock, ttl_s=60)
        store.submit(job, rpm=0, now=clock.now)
        claimed = claim_one(store, clock)
        assert claimed is not None
        store.submit(make_job(key, clock), rpm=0, now=clock.now)  # the claimed one left
        assert claim_one(store, clock, "w2") is not None
        assert store.release(job.id, "w1", now=clock.now)  # waiting again: counted again
        with pytest.raises(KeyQueueFull):
            store.submit(make_job(key, clock), rpm=0, now=clock.now)
        clock.advance(61)
        store.purge_expired(now=clock.now)
        store.submit(make_job(key, clock), rpm=0, now=clock.now)

    def test_a_refused_job_is_never_held_by_a_queue_limit(self, store: Store, clock: Clock) -> None:
        key = limited_key(store, clock, max_queued=1)
        store.submit(make_job(key, clock), rpm=0, now=clock.now, max_queued=1)
        blocked = refused(key, clock)
        store.submit(blocked, rpm=0, now=clock.now, max_queued=1)
        stored = store.get_job(blocked.id, now=clock.now)
        assert stored is not None and stored.status is JobStatus.FAILED

    def test_concurrent_submits_never_pass_the_limits(self, store: Store, clock: Clock) -> None:
        key = limited_key(store, clock, max_queued=5)

        def attempt(_: int) -> bool:
            try:
                store.submit(make_job(key, clock), rpm=0, now=clock.now)
            except KeyQueueFull:
                return False
            return True

        with ThreadPoolExecutor(max_workers=8) as pool:
            admitted = sum(pool.map(attempt, range(16)))
        assert admitted == 5
        assert balance(store, key) == pytest.approx(0.5)
        other = make_key(store, clock)

        def global_attempt(_: int) -> bool:
            try:
                store.submit(make_job(other, clock), rpm=0, now=clock.now, max_queued=8)
            except QueueFull:
                return False
            return True

        with ThreadPoolExecutor(max_workers=8) as pool:
            assert sum(pool.map(global_attempt, range(8))) == 3  # 5 queued already

    # --- start deadlines ------------------------------------------------------------------
    def test_a_job_not_started_by_its_deadline_fails_refunded(
        self, store: Store, clock: Clock
    ) -> None:
        key = make_key(store, clock, balance_usd=1.0)
        late = dataclasses.replace(
            deadline_job(key, clock, 10), webhook_url="https://hooks.example/done"
        )
        patient = make_job(key, clock)
        store.submit(late, rpm=0, now=clock.now)
        store.submit(patient, rpm=0, now=clock.now)
        stored = store.get_job(late.id, now=clock.now)
        assert stored is not None and stored.start_by == pytest.approx(clock.now + 10)
        clock.advance(10)
        claimed = claim_one(store, clock)
        assert claimed is not None and claimed.id == patient.id  # the late one is not run
        ended = store.get_job(late.id, now=clock.now)
        assert ended is not None and ended.status is JobStatus.FAILED
        assert ended.error_kind == START_TIMEOUT_KIND and "X-Start-Timeout" in (ended.error or "")
        assert balance(store, key) == pytest.approx(0.9)  # refunded; the patient job paid
        failed = [e for e in store.job_events(late.id) if e.type is JobEventType.FAILED]
        assert [e.error_kind for e in failed] == [START_TIMEOUT_KIND]
        # Its webhook follows the log like any ending's.
        log = store.events(after=None, limit=100)
        assert store.enqueue_webhooks(log, cursor=log[-1].id, now=clock.now) == 1
        delivery = store.get_webhook(late.id)
        assert delivery is not None and delivery.url == "https://hooks.example/done"

    def test_the_purge_sweep_ends_missed_deadlines_on_an_idle_cluster(
        self, store: Store, clock: Clock
    ) -> None:
        key = limited_key(store, clock, max_queued=1)
        late = deadline_job(key, clock, 5)
        store.submit(late, rpm=0, now=clock.now)
        clock.advance(4)
        store.purge_expired(now=clock.now)
        waiting = store.get_job(late.id, now=clock.now)
        assert waiting is not None and waiting.status is JobStatus.QUEUED
        clock.advance(1)
        store.purge_expired(now=clock.now)
        ended = store.get_job(late.id, now=clock.now)
        assert ended is not None and ended.error_kind == START_TIMEOUT_KIND
        assert balance(store, key) == pytest.approx(1.0)
        store.submit(make_job(key, clock), rpm=0, now=clock.now)  # its place is free

    def test_a_started_job_is_never_cut_by_its_deadline(self, store: Store, clock: Clock) -> None:
        key = make_key(store, clock)
        job = deadline_job(key, clock, 5)
        store.submit(job, rpm=0, now=clock.now)
        assert claim_one(store, clock, lease_s=600) is not None
        clock.advance(60)
        store.purge_expired(now=clock.now)
        assert claim_one(store, clock, "w2") is None
        running = store.get_job(job.id, now=clock.now)
        assert running is not None and running.status is JobStatus.PROCESSING
        assert job.id in store.heartbeat("w1", {job.id: None}, lease_s=30, now=clock.now).owned
        # A job whose worker died after it started is retried, not ended by the deadline.
        clock.advance(31)
        retried = claim_one(store, clock, "w2")
        assert retried is not None and retried.id == job.id and retried.attempts == 2
